-- 010_revocation_and_as_of.sql — OAuth revocations are notified to the agents; consents_as_of returns
-- exactly the columns of current_consents, in the same order.

-- A revoked (or deleted) client is announced on consent_sync_oauth_revoked with its client id, whoever
-- revokes it (the CLI or plain SQL): agents drop its cached tokens at once. The notification goes out
-- when the revoking transaction commits.
create function consent._notify_oauth_revoked()
returns trigger
language plpgsql
set search_path = pg_catalog, consent
as $$
begin
    perform pg_notify('consent_sync_oauth_revoked', old.client_id);
    return null;
end
$$;
comment on function consent._notify_oauth_revoked() is 'Trigger: notifies consent_sync_oauth_revoked with the client id of a revoked or deleted OAuth client.';

create trigger oauth_client_revoked
    after update of revoked_at on consent.oauth_clients
    for each row when (old.revoked_at is null and new.revoked_at is not null)
    execute function consent._notify_oauth_revoked();
create trigger oauth_client_deleted
    after delete on consent.oauth_clients
    for each row execute function consent._notify_oauth_revoked();

-- consents_as_of had the view's contract columns but not option_type and raw_status, so the two could
-- not be compared row for row. The history does not keep either: option_type is a property of the
-- item (taken from its current row); raw_status is known when the state at `at` is still the current
-- one (same change), NULL for a state since superseded.
drop function consent.consents_as_of(timestamptz);
create function consent.consents_as_of(at timestamptz)
returns table (
    source text, tenant_id text, user_id text, external_ref text, regulation text, purpose_id text,
    lawful_basis text, status text, valid_until timestamptz, in_force boolean, changed_at timestamptz,
    valid_from timestamptz, option_type text, raw_status text, cause text)
language sql stable security definer
set search_path = pg_catalog, consent
as $$
    select h.source, h.tenant_id, h.user_id, u.external_ref, nullif(h.regulation, ''), h.item_id,
           h.lawful_basis, h.status, h.valid_until,
           (h.status in ('granted', 'claimed') and (h.valid_until is null or h.valid_until > at)),
           h.changed_at, h.valid_from, c.option_type,
           case when c.changed_at = h.changed_at and c.status = h.status then c.raw_status end,
           h.cause
      from (select distinct on (ch.source, ch.tenant_id, ch.user_id, ch.regulation, ch.item_id, ch.lawful_basis)
                   ch.*
              from consent.consent_history ch
             where ch.item_kind = 'purpose' and ch.changed_at <= at
             order by ch.source, ch.tenant_id, ch.user_id, ch.regulation, ch.item_id, ch.lawful_basis,
                      ch.changed_at desc, ch.seen_at desc, ch.seen_at2 desc, ch.seen_tie desc, ch.id desc) h
      left join consent.users u using (source, tenant_id, user_id)
      left join consent.consents c
             on c.source = h.source and c.tenant_id = h.tenant_id and c.user_id = h.user_id
            and c.regulation = h.regulation and c.item_kind = 'purpose' and c.item_id = h.item_id
            and c.lawful_basis = h.lawful_basis
     where h.status is not null
$$;
comment on function consent.consents_as_of(timestamptz) is 'Consent state as it stood at a source-side time (compared with changed_at), with the columns of current_consents in the same order; in_force is evaluated at that time; raw_status is NULL for a state that has since been superseded.';

revoke all on function consent.consents_as_of(timestamptz) from public;
grant execute on function consent.consents_as_of(timestamptz) to consent_analyst;
revoke all on function consent._notify_oauth_revoked() from public;
