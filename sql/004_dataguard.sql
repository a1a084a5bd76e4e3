-- 004_dataguard.sql — DataGuard CPM: effective permissions (full state), consent receipts (deltas),
-- citizen emails (an outbox for a mailer).
--
-- DataGuard permissions land in consent.consents with regulation '' (shown as NULL), one row per
-- option × lawful basis (justification). Ordering key: (obtainedAt, recordedAt, transactionId), so an
-- equal transactionId is a no-op and a late retry never regresses newer state. Preferences: (updatedAt,
-- updatedAt, submissionId).

create table consent.citizen_emails (
    id              bigint generated always as identity primary key,
    delivery_id     bigint not null,
    received_at     timestamptz not null default now(),
    tenant_id       text,
    citizen_id      text,
    external_ref    text,
    email_type      text,
    payload         jsonb not null,
    status          text not null default 'pending' check (status in ('pending', 'sending', 'sent', 'failed', 'discarded')),
    attempts        integer not null default 0,
    last_error      text,
    sent_at         timestamptz
);
create index citizen_emails_pending on consent.citizen_emails (received_at) where status in ('pending', 'failed');
comment on table consent.citizen_emails is 'Outbox of DataGuard citizen emails (e.g. double opt-in confirmations) for the company''s mailer to send. Not consent state. The payload shape is undocumented by DataGuard and kept as received.';
comment on column consent.citizen_emails.id is 'Outbox id.';
comment on column consent.citizen_emails.delivery_id is 'Delivery that carried the email (consent.deliveries).';
comment on column consent.citizen_emails.received_at is 'When the agent received it.';
comment on column consent.citizen_emails.tenant_id is 'applicationId, when present.';
comment on column consent.citizen_emails.citizen_id is 'citizenId, when present.';
comment on column consent.citizen_emails.external_ref is 'externalRef, when present.';
comment on column consent.citizen_emails.email_type is 'emailType, when present.';
comment on column consent.citizen_emails.payload is 'The delivery as received (JSON object; contains personal data).';
comment on column consent.citizen_emails.status is 'pending (to send), sending, sent, failed (to retry), discarded. The mailer moves it on.';
comment on column consent.citizen_emails.attempts is 'Send attempts so far (maintained by the mailer).';
comment on column consent.citizen_emails.last_error is 'Last send error (maintained by the mailer).';
comment on column consent.citizen_emails.sent_at is 'When it was sent (maintained by the mailer).';

-- A full state (p_snapshot) or a delta of one citizen.
create function consent._apply_dataguard(d jsonb, p_delivery bigint, p_snapshot boolean, out outcome text, out reason text)
language plpgsql as $$
#variable_conflict use_column
declare
    v_tenant   text := d->>'tenant';
    v_user     text := d->>'user';
    v_sent     timestamptz := (d->>'at')::timestamptz;
    v_newest   timestamptz;
    v_total    integer;
    v_equal    integer;
    v_written  integer;
    v_removed  integer := 0;
begin
    -- The newest source-side time the delivery carries (what a removal must not be older than).
    select max(t) into v_newest from (
        select greatest((x->>'at')::timestamptz, (x->>'at2')::timestamptz) as t
          from jsonb_array_elements(coalesce(d->'items', '[]')) x
        union all
        select (x->>'at')::timestamptz from jsonb_array_elements(coalesce(d->'prefs', '[]')) x) s;

    -- Items already stored with exactly this ordering key (same transaction / submission): no-ops.
    select count(*) into v_equal
      from jsonb_to_recordset(coalesce(d->'items', '[]')) as x(kind text, id text, basis text, at timestamptz, at2 timestamptz, tie text)
      join consent.consents c
        on c.source = 'dataguard' and c.tenant_id = v_tenant and c.user_id = v_user and c.regulation = ''
       and c.item_kind = x.kind and c.item_id = x.id and c.lawful_basis = x.basis
       and (c.seen_at, c.seen_at2, c.seen_tie) = (x.at, x.at2, x.tie collate "C");
    select v_equal + count(*) into v_equal
      from jsonb_to_recordset(coalesce(d->'prefs', '[]')) as x(pref text, at timestamptz, at2 timestamptz, tie text)
      join consent.preferences p
        on p.source = 'dataguard' and p.tenant_id = v_tenant and p.user_id = v_user and p.regulation = ''
       and p.purpose_id = '' and p.preference_id = x.pref
       and (p.seen_at, p.seen_at2, p.seen_tie) = (x.at, x.at2, x.tie collate "C");
    v_total := jsonb_array_length(coalesce(d->'items', '[]')) + jsonb_array_length(coalesce(d->'prefs', '[]'));

    v_written := consent._upsert_consents('dataguard', v_tenant, v_user, '', d->'items', null, null, '', null, false, p_delivery)
               + consent._upsert_preferences('dataguard', v_tenant, v_user, '', d->'prefs', null, null, '', null, false, p_delivery);

    -- Removal (PRODUCT §4): only items the snapshot provably supersedes — the snapshot's newest item is
    -- not older than the stored item, and it was sent after the stored item was recorded.
    if p_snapshot and v_newest is not null and v_sent is not null then
        with removed as (
            delete from consent.consents c
             where c.source = 'dataguard' and c.tenant_id = v_tenant and c.user_id = v_user and c.regulation = ''
               and not exists (select 1 from jsonb_to_recordset(coalesce(d->'items', '[]')) as x(kind text, id text, basis text)
                                where x.kind = c.item_kind and x.id = c.item_id and x.basis = c.lawful_basis)
               and greatest(c.seen_at, c.seen_at2) <= v_newest
               and greatest(c.seen_at, c.seen_at2) < v_sent
            returning c.*
        ), logged as (
            insert into consent.consent_history
                   (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, previous_status,
                    valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
            select r.source, r.tenant_id, r.user_id, r.regulation, r.item_kind, r.item_id, r.lawful_basis, null, r.status,
                   null, null, v_newest, v_newest, v_sent, '', 'dataguard:effective-permissions', p_delivery
              from removed r
            returning 1
        )
        select count(*) into v_removed from removed;

        with removed as (
            delete from consent.preferences p
             where p.source = 'dataguard' and p.tenant_id = v_tenant and p.user_id = v_user and p.regulation = ''
               and not exists (select 1 from jsonb_to_recordset(coalesce(d->'prefs', '[]')) as x(pref text)
                                where x.pref = p.preference_id)
               and greatest(p.seen_at, p.seen_at2) <= v_newest
               and greatest(p.seen_at, p.seen_at2) < v_sent
            returning p.*
        ), logged as (
            insert into consent.preference_history
                   (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids, previous_value_ids,
                    changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
            select r.source, r.tenant_id, r.user_id, r.regulation, r.purpose_id, r.preference_id, null, r.value_ids,
                   v_newest, v_newest, v_sent, '', 'dataguard:effective-permissions', p_delivery
              from removed r
            returning 1
        )
        select v_removed + count(*) into v_removed from removed;
    end if;

    if v_written + v_removed = 0 and v_equal < v_total then
        outcome := 'stale';
        reason := 'every item is older than the stored state';
        return;
    end if;
    perform consent._upsert_user('dataguard', v_tenant, v_user, d->'user_info', coalesce(v_newest, v_sent, now()),
                                 p_snapshot, false, p_delivery);
    outcome := 'applied';
    if v_written + v_removed = 0 then
        reason := 'every item is already stored (same transactions and submissions)';
    end if;
end
$$;

-- A citizen email: into the outbox, answered `stored`.
create function consent._apply_dataguard_email(d jsonb, p_delivery bigint, out outcome text, out reason text)
language plpgsql as $$
begin
    insert into consent.citizen_emails (delivery_id, tenant_id, citizen_id, external_ref, email_type, payload)
    values (p_delivery, d->>'tenant', d->>'user', d->'user_info'->>'external_ref', d->'email'->>'emailType', d->'email');
    outcome := 'stored';
    reason := 'citizen email kept in consent.citizen_emails for the mailer';
end
$$;

revoke all on all tables in schema consent from public;
revoke all on all functions in schema consent from public;
grant execute on function consent.consents_as_of(timestamptz) to consent_analyst;
