-- 003_views.sql — the analysts' contract (PRODUCT §5): views and consents_as_of, and the read-only role.
-- Names and columns here are a public interface: add columns at the end, never rename or drop one.

create view consent.current_consents as
select c.source,
       c.tenant_id,
       c.user_id,
       u.external_ref,
       nullif(c.regulation, '') as regulation,
       c.item_id as purpose_id,
       c.lawful_basis,
       c.status,
       c.valid_until,
       (c.status in ('granted', 'claimed') and (c.valid_until is null or c.valid_until > now())) as in_force,
       c.changed_at,
       c.valid_from,
       c.option_type,
       c.raw_status,
       c.cause
  from consent.consents c
  left join consent.users u using (source, tenant_id, user_id)
 where c.item_kind = 'purpose';

comment on view consent.current_consents is 'Current consent state: one row per user × regulation × purpose × lawful basis, for Didomi and DataGuard.';
comment on column consent.current_consents.source is 'didomi or dataguard.';
comment on column consent.current_consents.tenant_id is 'Didomi organization_id / DataGuard applicationId.';
comment on column consent.current_consents.user_id is 'Didomi user id / DataGuard citizenId.';
comment on column consent.current_consents.external_ref is 'Didomi organization_user_id / DataGuard externalRef (NULL when unknown).';
comment on column consent.current_consents.regulation is 'Didomi regulation (gdpr when the platform gave none); NULL for DataGuard.';
comment on column consent.current_consents.purpose_id is 'Didomi purpose id / DataGuard optionId.';
comment on column consent.current_consents.lawful_basis is 'consent, legitimate_interest, contract, public_interest, vital_interest or legal_obligation.';
comment on column consent.current_consents.status is 'granted, denied, pending, claimed, objected, objection_upheld or unset.';
comment on column consent.current_consents.valid_until is 'End of validity; NULL = no end.';
comment on column consent.current_consents.in_force is 'True when status is granted or claimed and valid_until is NULL or later than now.';
comment on column consent.current_consents.changed_at is 'Source-side time of the change that set this row.';
comment on column consent.current_consents.valid_from is 'Start of validity (DataGuard validFrom).';
comment on column consent.current_consents.option_type is 'DataGuard optionType: option or group; NULL for Didomi.';
comment on column consent.current_consents.raw_status is 'Status as the platform sent it.';
comment on column consent.current_consents.cause is 'Event, snapshot, transaction or reconciliation run that set the row.';

create view consent.current_vendor_consents as
select c.source,
       c.tenant_id,
       c.user_id,
       u.external_ref,
       nullif(c.regulation, '') as regulation,
       c.item_id as vendor_id,
       c.lawful_basis,
       c.status,
       c.changed_at,
       c.cause
  from consent.consents c
  left join consent.users u using (source, tenant_id, user_id)
 where c.item_kind = 'vendor';

comment on view consent.current_vendor_consents is 'Current Didomi vendor choices (consents.vendors): one row per user × regulation × vendor × lawful basis.';
comment on column consent.current_vendor_consents.source is 'didomi.';
comment on column consent.current_vendor_consents.tenant_id is 'Didomi organization_id.';
comment on column consent.current_vendor_consents.user_id is 'Didomi user id.';
comment on column consent.current_vendor_consents.external_ref is 'Didomi organization_user_id.';
comment on column consent.current_vendor_consents.regulation is 'Didomi regulation.';
comment on column consent.current_vendor_consents.vendor_id is 'Vendor id.';
comment on column consent.current_vendor_consents.lawful_basis is 'consent (enabled/disabled lists) or legitimate_interest (enabled_li/disabled_li lists).';
comment on column consent.current_vendor_consents.status is 'granted/denied for consent, claimed/objected for legitimate interest.';
comment on column consent.current_vendor_consents.changed_at is 'Source-side time of the change that set this row.';
comment on column consent.current_vendor_consents.cause is 'Event or snapshot that set the row.';

create view consent.current_preferences as
select p.source,
       p.tenant_id,
       p.user_id,
       nullif(p.regulation, '') as regulation,
       nullif(p.purpose_id, '') as purpose_id,
       p.preference_id,
       p.value_ids,
       p.changed_at,
       u.external_ref,
       p.cause
  from consent.preferences p
  left join consent.users u using (source, tenant_id, user_id);

comment on view consent.current_preferences is 'Current preference choices: one row per user × regulation × purpose × preference.';
comment on column consent.current_preferences.source is 'didomi or dataguard.';
comment on column consent.current_preferences.tenant_id is 'Didomi organization_id / DataGuard applicationId.';
comment on column consent.current_preferences.user_id is 'Didomi user id / DataGuard citizenId.';
comment on column consent.current_preferences.regulation is 'Didomi regulation; NULL for DataGuard.';
comment on column consent.current_preferences.purpose_id is 'Didomi: the purpose the preference hangs under; DataGuard: NULL.';
comment on column consent.current_preferences.preference_id is 'Didomi preference id / DataGuard preference reference.';
comment on column consent.current_preferences.value_ids is 'Selected value ids (DataGuard choice references), sorted.';
comment on column consent.current_preferences.changed_at is 'Source-side time of the change that set these values.';
comment on column consent.current_preferences.external_ref is 'Didomi organization_user_id / DataGuard externalRef.';
comment on column consent.current_preferences.cause is 'Event, snapshot or submission that set the row.';

create view consent.current_users as
select u.source,
       u.tenant_id,
       u.user_id,
       u.external_ref,
       u.version,
       u.updated_at,
       u.deleted_at,
       u.created_at,
       u.country,
       u.last_seen_country
  from consent.users u;

comment on view consent.current_users is 'One row per platform user, deleted users included (deleted_at set, identifiers cleared).';
comment on column consent.current_users.source is 'didomi or dataguard.';
comment on column consent.current_users.tenant_id is 'Didomi organization_id / DataGuard applicationId.';
comment on column consent.current_users.user_id is 'Didomi user id / DataGuard citizenId.';
comment on column consent.current_users.external_ref is 'Didomi organization_user_id / DataGuard externalRef.';
comment on column consent.current_users.version is 'Didomi user version (newest applied snapshot); NULL for DataGuard.';
comment on column consent.current_users.updated_at is 'Source-side time of the newest change applied to the user.';
comment on column consent.current_users.deleted_at is 'NULL unless the user was deleted at the source.';
comment on column consent.current_users.created_at is 'Source-side creation time.';
comment on column consent.current_users.country is 'Didomi country.';
comment on column consent.current_users.last_seen_country is 'Didomi last_seen_country.';

-- State as it stood at a source-side time, rebuilt from the history.
create function consent.consents_as_of(at timestamptz)
returns table (
    source text, tenant_id text, user_id text, external_ref text, regulation text, purpose_id text,
    lawful_basis text, status text, valid_until timestamptz, in_force boolean, changed_at timestamptz,
    valid_from timestamptz, cause text)
language sql stable security definer
set search_path = pg_catalog, consent
as $$
    select h.source, h.tenant_id, h.user_id, u.external_ref, nullif(h.regulation, ''), h.item_id,
           h.lawful_basis, h.status, h.valid_until,
           (h.status in ('granted', 'claimed') and (h.valid_until is null or h.valid_until > at)),
           h.changed_at, h.valid_from, h.cause
      from (select distinct on (ch.source, ch.tenant_id, ch.user_id, ch.regulation, ch.item_id, ch.lawful_basis)
                   ch.*
              from consent.consent_history ch
             where ch.item_kind = 'purpose' and ch.changed_at <= at
             order by ch.source, ch.tenant_id, ch.user_id, ch.regulation, ch.item_id, ch.lawful_basis,
                      ch.changed_at desc, ch.seen_at desc, ch.seen_at2 desc, ch.seen_tie desc, ch.id desc) h
      left join consent.users u using (source, tenant_id, user_id)
     where h.status is not null
$$;
comment on function consent.consents_as_of(timestamptz) is 'Consent state as it stood at a source-side time (compared with changed_at), with the columns of current_consents; in_force is evaluated at that time.';

-- The analysts' role: the views and consents_as_of, nothing else.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'consent_analyst') then
        create role consent_analyst nologin;
    end if;
exception
    when duplicate_object or unique_violation then
        null;  -- created meanwhile by a migration of another database of the cluster
end
$$;
revoke all on all tables in schema consent from public;
revoke all on all functions in schema consent from public;
grant usage on schema consent to consent_analyst;
grant select on consent.current_consents, consent.current_vendor_consents, consent.current_preferences,
                consent.current_users to consent_analyst;
grant execute on function consent.consents_as_of(timestamptz) to consent_analyst;
