-- 012_dataguard_repeated_items.sql — a DataGuard delivery whose every item is already stored with the
-- same transaction / submission (a different body carrying the same items: a retry that was
-- re-serialised, or a receipt repeating a snapshot's transactions) is a duplicate (PRODUCT §4:
-- idempotency keys on the body and on each item's transactionId / submissionId), not 'applied'.
-- 004's function with only its outcome changed; a delivery without items is still 'applied'.

create or replace function consent._apply_dataguard(d jsonb, p_delivery bigint, p_snapshot boolean, out outcome text, out reason text)
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
    -- Every item already stored with this very transaction / submission: the same change again.
    if v_written + v_removed = 0 and v_total > 0 then
        outcome := 'duplicate';
        reason := 'every item is already stored (same transactions and submissions)';
    else
        outcome := 'applied';
    end if;
end
$$;
