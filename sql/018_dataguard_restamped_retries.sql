-- 018_dataguard_restamped_retries.sql — a DataGuard retry whose sentAt was re-stamped no longer brings
-- back what a newer effective-permissions snapshot removed.
--
-- DataGuard may re-stamp sentAt on every retry (DOMAIN §5 item 14). 017 judged a late delivery against
-- the citizen's removal horizon only when it was also sent before the horizon's snapshot, so the hourly
-- retry of an older snapshot (or receipt), arriving after a newer snapshot that no longer carried its
-- item, inserted the item again: arrived first, the same item had been removed. The order decided.
--
-- The horizon test now asks what 012's removal asks, so both arrival orders agree: a delivery whose
-- newest item is not newer than the horizon (the snapshot would have been newer than every stored item,
-- this delivery's included) has its items with no stored row left out when they are older than the
-- horizon's sentAt (the snapshot would have removed them). The delivery's own sentAt plays no part.
-- An item recorded after that snapshot was sent (a re-grant, even one with an earlier obtainedAt) is
-- not older than its sentAt and is applied.
--
-- The function is 017's, redefined whole (released migrations are not edited); only the test changed.

create or replace function consent._apply_dataguard(d jsonb, p_delivery bigint, p_snapshot boolean, out outcome text, out reason text)
language plpgsql as $$
#variable_conflict use_column
declare
    v_tenant       text := d->>'tenant';
    v_user         text := d->>'user';
    v_sent         timestamptz := (d->>'at')::timestamptz;
    v_total        integer := jsonb_array_length(coalesce(d->'items', '[]')) + jsonb_array_length(coalesce(d->'prefs', '[]'));
    v_newest       timestamptz;
    v_horizon      timestamptz;
    v_horizon_sent timestamptz;
    v_items        jsonb;
    v_prefs        jsonb;
    v_stale        integer := 0;
    v_stored       timestamptz;
    v_complete     boolean := false;
begin
    -- The newest source-side time the delivery carries (as 012 computes it).
    select max(t) into v_newest from (
        select greatest((x->>'at')::timestamptz, (x->>'at2')::timestamptz) as t
          from jsonb_array_elements(coalesce(d->'items', '[]')) x
        union all
        select (x->>'at')::timestamptz from jsonb_array_elements(coalesce(d->'prefs', '[]')) x) s;

    select u.removal_horizon, u.removal_horizon_sent_at into v_horizon, v_horizon_sent
      from consent.users u where u.source = 'dataguard' and u.tenant_id = v_tenant and u.user_id = v_user;

    -- Not newer than a snapshot that could remove items: what that snapshot no longer carried and would
    -- have removed (an item older than its sentAt, as 012 removes) stays out.
    if v_newest <= v_horizon then
        select coalesce(jsonb_agg(x.value order by x.n) filter (where x.stored), '[]'), count(*) filter (where not x.stored)
          into v_items, v_stale
          from (select i.value, i.n,
                       exists (select 1 from consent.consents c
                                where c.source = 'dataguard' and c.tenant_id = v_tenant and c.user_id = v_user
                                  and c.regulation = '' and c.item_kind = i.value->>'kind'
                                  and c.item_id = i.value->>'id' and c.lawful_basis = i.value->>'basis')
                       or not coalesce(greatest((i.value->>'at')::timestamptz, (i.value->>'at2')::timestamptz) < v_horizon_sent, false) as stored
                  from jsonb_array_elements(coalesce(d->'items', '[]')) with ordinality as i(value, n)) x;
        select coalesce(jsonb_agg(x.value order by x.n) filter (where x.stored), '[]'), v_stale + count(*) filter (where not x.stored)
          into v_prefs, v_stale
          from (select i.value, i.n,
                       exists (select 1 from consent.preferences p
                                where p.source = 'dataguard' and p.tenant_id = v_tenant and p.user_id = v_user
                                  and p.regulation = '' and p.purpose_id = coalesce(i.value->>'purpose', '')
                                  and p.preference_id = i.value->>'pref')
                       or not coalesce((i.value->>'at')::timestamptz < v_horizon_sent, false) as stored
                  from jsonb_array_elements(coalesce(d->'prefs', '[]')) with ordinality as i(value, n)) x;
        if v_stale = v_total then
            outcome := 'stale';
            reason := format('older than the citizen''s effective permissions sent at %s (newest item %s), which no longer carried its items',
                             v_horizon_sent, v_horizon);
            return;
        end if;
        if v_stale > 0 then
            d := d || jsonb_build_object('items', v_items, 'prefs', v_prefs);
        end if;
    end if;

    -- Removal (PRODUCT §4) only by a snapshot whose newest item is not older than any stored item of the
    -- citizen; 012 removes nothing from a snapshot without its sentAt.
    if p_snapshot and v_newest is not null and v_sent is not null then
        select max(t) into v_stored from (
            select greatest(c.seen_at, c.seen_at2) as t from consent.consents c
             where c.source = 'dataguard' and c.tenant_id = v_tenant and c.user_id = v_user and c.regulation = ''
            union all
            select greatest(p.seen_at, p.seen_at2) from consent.preferences p
             where p.source = 'dataguard' and p.tenant_id = v_tenant and p.user_id = v_user and p.regulation = '') s;
        v_complete := v_stored is null or v_stored <= v_newest;
        if not v_complete then
            d := d - 'at';
        end if;
    end if;

    select r.outcome, r.reason into outcome, reason from consent._apply_dataguard_past_horizon(d, p_delivery, p_snapshot) r;

    if v_stale > 0 and outcome = 'duplicate' then
        outcome := 'stale';
        reason := format('every item is already stored or older than the citizen''s effective permissions sent at %s (newest item %s), which no longer carried it',
                         v_horizon_sent, v_horizon);
    elsif v_stale > 0 and outcome = 'applied' then
        reason := format('%s of %s items older than the citizen''s effective permissions sent at %s (newest item %s), which no longer carried them: not applied',
                         v_stale, v_total, v_horizon_sent, v_horizon);
    end if;
    if v_complete and outcome in ('applied', 'duplicate') then
        update consent.users u
           set removal_horizon = greatest(u.removal_horizon, v_newest),
               removal_horizon_sent_at = greatest(u.removal_horizon_sent_at, v_sent)
         where u.source = 'dataguard' and u.tenant_id = v_tenant and u.user_id = v_user;
    end if;
end
$$;
comment on function consent._apply_dataguard(jsonb, bigint, boolean) is 'DataGuard effective permissions (p_snapshot) or consent receipt: items with no stored row in a delivery not newer than the removal horizon, and older than its sentAt, are stale; a snapshot removes only when newer than every stored item, and then moves the horizon; the rest is consent._apply_dataguard_past_horizon.';
comment on column consent.users.removal_horizon is 'DataGuard: newest item time (obtainedAt, recordedAt, preference updatedAt) of the effective-permissions snapshots that could remove items (not older than any stored item of the citizen); the greatest. A later delivery not newer than it does not insert an item with no stored row that is older than removal_horizon_sent_at. NULL for Didomi.';
