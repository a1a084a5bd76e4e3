-- 017_ordering_fixes.sql — two ordering rules of PRODUCT §4 that depended on arrival order.
--
-- 1. Didomi users are ordered by version, then updated_at. The snapshot guard (009) accepted a higher
--    version whatever its updated_at, but its rows were then written under the row guard, which orders by
--    (time, tie): a v4 dated before the stored v3 was answered applied, made current_users.version 4, and
--    left every consent and preference row at v3's values (none removed, none changed). A snapshot accepted
--    by version now takes effect no earlier than the stored snapshot of its regulation: its time is raised
--    to the stored one's updated_at, so it replaces the state as a newer snapshot does (its values win on
--    the version tie-break, the purposes it dropped go), rows set by events after that time stay, and the
--    history dates it where the rows say (consents_as_of(now()) agrees with current_consents). The raised
--    time is what user_snapshots records, so a later event is judged against the time the rows carry.
--
-- 2. DataGuard effective permissions. An item missing from a snapshot was removed when it was stored
--    first, but inserted when it came late (012 inserts any item with no stored row): a late older receipt
--    brought back what a newer snapshot had left out. And the removal rule checked each missing item alone,
--    where PRODUCT §4 asks that the snapshot be newer than every stored item of the citizen. Now:
--    - a snapshot removes a missing item only when its newest item time (obtainedAt, recordedAt,
--      preference updatedAt) is not older than any stored item of the citizen, permissions and preferences
--      (and, as before, the item is older than the snapshot's sentAt);
--    - such a snapshot records on the citizen its newest item time and sentAt (users.removal_horizon,
--      removal_horizon_sent_at: the greatest of each);
--    - a later delivery (receipt or snapshot) whose newest item is not newer than that horizon and whose
--      sentAt is earlier is provably older than that snapshot: its items for an option/basis or
--      preference with no stored row are stale, not inserted — had it arrived first, the snapshot would
--      have removed them. A delivery carrying an item newer than the horizon is not judged so: arrived
--      first, that item would have kept the snapshot from removing anything. A delivery all of whose items
--      are stale answers stale.
--
-- Released migrations are not edited, and both changes are wrappers around the released functions, which
-- are renamed (as 016 did): the Didomi one hands 016's snapshot rule its rows with their time raised; the
-- DataGuard one filters the stale items out, hands 012's rule a snapshot that fails the citizen-wide test
-- without its sentAt (012 removes nothing without one), and records the horizon.

-- ---------------------------------------------------------------------------------------------------
-- 1. Didomi: a snapshot accepted by version takes effect no earlier than the state it replaces.
-- ---------------------------------------------------------------------------------------------------

alter function consent._apply_didomi_snapshots(consent.batch_user[]) rename to _apply_didomi_snapshots_in_time;
comment on function consent._apply_didomi_snapshots_in_time(consent.batch_user[]) is 'Didomi user snapshots whose time is already raised to the stored snapshot they replace: the deletion horizon (016), then the version guard and the snapshot rule (009).';

create function consent._apply_didomi_snapshots(p_rows consent.batch_user[])
returns table (pos integer, outcome text, reason text)
language plpgsql
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_rows      consent.batch_user[];
    v_moved_pos integer[];
    v_moved_at  timestamptz[];
    v_moved_why text[];
begin
    -- A higher version than the stored snapshot of its regulation, dated before it: dated at it instead
    -- (on the equal time the version tie-break makes it the newer). Not one dated at or before the
    -- user's deletion (016's horizon): versions may start again after a deletion, and only a snapshot
    -- newer than the deletion revives. One index lookup per snapshot; the users row is read, and the
    -- batch rebuilt, only for a snapshot that moves (in practice never: Didomi dates versions in order).
    select array_agg((x.d).pos) filter (where x.moved),
           array_agg(x.s_at) filter (where x.moved),
           array_agg(format('version %s is newer than the stored %s state (version %s, updated_at %s) but dated before it (updated_at %s): applied as of %s',
                            (x.d).version, (x.d).regulation, x.s_version, x.s_at, (x.d).at, x.s_at))
               filter (where x.moved)
      into v_moved_pos, v_moved_at, v_moved_why
      from (select d, s.version as s_version, s.updated_at as s_at,
                   coalesce(d.version > s.version and d.at < s.updated_at
                            and d.at > coalesce((select u.last_deleted_at from consent.users u
                                                  where u.source = 'didomi' and u.tenant_id = d.tenant_id
                                                    and u.user_id = d.user_id), '-infinity'), false) as moved
              from unnest(p_rows) d
              left join lateral (select s.version, s.updated_at from consent.user_snapshots s
                                  where s.source = 'didomi' and s.tenant_id = d.tenant_id and s.user_id = d.user_id
                                    and s.regulation = d.regulation
                                 offset 0) s on true) x;

    if v_moved_pos is null then
        return query select * from consent._apply_didomi_snapshots_in_time(p_rows);
        return;
    end if;
    select array_agg(case when m.at is not null
                          then row(d.pos, d.delivery_id, d.tenant_id, d.user_id, d.regulation, d.dedup_key, d.version,
                                   m.at, d.tie, d.cause, d.info, d.items, d.prefs, d.replaces)::consent.batch_user
                          else d end order by d.pos)
      into v_rows
      from unnest(p_rows) d
      left join unnest(v_moved_pos, v_moved_at) as m(pos, at) on m.pos = d.pos;
    return query
        select r.pos, r.outcome, case when r.outcome = 'applied' then coalesce(r.reason, m.why) else r.reason end
          from consent._apply_didomi_snapshots_in_time(v_rows) r
          left join unnest(v_moved_pos, v_moved_why) as m(pos, why) on m.pos = r.pos;
end
$$;
comment on function consent._apply_didomi_snapshots(consent.batch_user[]) is 'Didomi user snapshots of distinct users: a snapshot of a higher version dated before the stored one of its regulation takes effect at the stored one''s time, then consent._apply_didomi_snapshots_in_time.';
revoke all on function consent._apply_didomi_snapshots(consent.batch_user[]) from public;
revoke all on function consent._apply_didomi_snapshots_in_time(consent.batch_user[]) from public;

comment on column consent.user_snapshots.updated_at is 'Didomi user updated_at; for a snapshot whose version is newer than the one it replaced but whose updated_at is older, the replaced one''s updated_at (the time its rows took effect).';

-- ---------------------------------------------------------------------------------------------------
-- 2. DataGuard: removals only by a snapshot newer than every stored item, and the removal horizon.
-- ---------------------------------------------------------------------------------------------------

alter table consent.users add column removal_horizon timestamptz;
comment on column consent.users.removal_horizon is 'DataGuard: newest item time (obtainedAt, recordedAt, preference updatedAt) of the effective-permissions snapshots that could remove items (not older than any stored item of the citizen); the greatest. A later delivery not newer than it and sent before removal_horizon_sent_at does not insert an item with no stored row. NULL for Didomi.';
alter table consent.users add column removal_horizon_sent_at timestamptz;
comment on column consent.users.removal_horizon_sent_at is 'DataGuard: sentAt of the effective-permissions snapshots that set removal_horizon; the greatest.';

-- Citizens whose snapshots removed items before this migration: 012 recorded each removal with the
-- snapshot's newest item time (changed_at) and its sentAt (seen_at2). Such a snapshot counts when it
-- would also have passed the citizen-wide test: no item of the citizen recorded before it (history, or
-- the current row of a write the history does not show) is newer than its newest item. A snapshot that
-- removed nothing left no trace: such citizens get their horizon from their next snapshot.
with removals as (
    select r.tenant_id, r.user_id, r.delivery_id, max(r.changed_at) as at, max(r.seen_at2) as sent,
           min(r.recorded_at) as recorded
      from (select tenant_id, user_id, delivery_id, changed_at, seen_at2, recorded_at
              from consent.consent_history
             where source = 'dataguard' and status is null and cause = 'dataguard:effective-permissions'
               and delivery_id is not null
            union all
            select tenant_id, user_id, delivery_id, changed_at, seen_at2, recorded_at
              from consent.preference_history
             where source = 'dataguard' and value_ids is null and cause = 'dataguard:effective-permissions'
               and delivery_id is not null) r
     group by r.tenant_id, r.user_id, r.delivery_id
),
proven as (
    select r.tenant_id, r.user_id, max(r.at) as at, max(r.sent) as sent
      from removals r
     where not exists (select 1 from consent.consent_history h
                        where h.source = 'dataguard' and h.tenant_id = r.tenant_id and h.user_id = r.user_id
                          and h.status is not null and greatest(h.seen_at, h.seen_at2) > r.at
                          and (h.delivery_id < r.delivery_id or (h.delivery_id is null and h.recorded_at < r.recorded)))
       and not exists (select 1 from consent.preference_history h
                        where h.source = 'dataguard' and h.tenant_id = r.tenant_id and h.user_id = r.user_id
                          and h.value_ids is not null and greatest(h.seen_at, h.seen_at2) > r.at
                          and (h.delivery_id < r.delivery_id or (h.delivery_id is null and h.recorded_at < r.recorded)))
       and not exists (select 1 from consent.consents c
                        where c.source = 'dataguard' and c.tenant_id = r.tenant_id and c.user_id = r.user_id
                          and greatest(c.seen_at, c.seen_at2) > r.at and c.delivery_id < r.delivery_id)
       and not exists (select 1 from consent.preferences p
                        where p.source = 'dataguard' and p.tenant_id = r.tenant_id and p.user_id = r.user_id
                          and greatest(p.seen_at, p.seen_at2) > r.at and p.delivery_id < r.delivery_id)
     group by r.tenant_id, r.user_id
)
update consent.users u
   set removal_horizon = p.at, removal_horizon_sent_at = p.sent
  from proven p
 where u.source = 'dataguard' and u.tenant_id = p.tenant_id and u.user_id = p.user_id;

alter function consent._apply_dataguard(jsonb, bigint, boolean) rename to _apply_dataguard_past_horizon;
comment on function consent._apply_dataguard_past_horizon(jsonb, bigint, boolean) is 'DataGuard delivery whose items are already checked against the removal horizon: the ordering guard per item, removals by a snapshot that has its sentAt (012).';

create function consent._apply_dataguard(d jsonb, p_delivery bigint, p_snapshot boolean, out outcome text, out reason text)
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

    -- Provably older than a snapshot that could remove items: what it no longer carried stays out.
    if v_newest <= v_horizon and v_sent < v_horizon_sent then
        select coalesce(jsonb_agg(x.value order by x.n) filter (where x.stored), '[]'), count(*) filter (where not x.stored)
          into v_items, v_stale
          from (select i.value, i.n,
                       exists (select 1 from consent.consents c
                                where c.source = 'dataguard' and c.tenant_id = v_tenant and c.user_id = v_user
                                  and c.regulation = '' and c.item_kind = i.value->>'kind'
                                  and c.item_id = i.value->>'id' and c.lawful_basis = i.value->>'basis') as stored
                  from jsonb_array_elements(coalesce(d->'items', '[]')) with ordinality as i(value, n)) x;
        select coalesce(jsonb_agg(x.value order by x.n) filter (where x.stored), '[]'), v_stale + count(*) filter (where not x.stored)
          into v_prefs, v_stale
          from (select i.value, i.n,
                       exists (select 1 from consent.preferences p
                                where p.source = 'dataguard' and p.tenant_id = v_tenant and p.user_id = v_user
                                  and p.regulation = '' and p.purpose_id = coalesce(i.value->>'purpose', '')
                                  and p.preference_id = i.value->>'pref') as stored
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
comment on function consent._apply_dataguard(jsonb, bigint, boolean) is 'DataGuard effective permissions (p_snapshot) or consent receipt: items provably older than the removal horizon with no stored row are stale; a snapshot removes only when newer than every stored item, and then moves the horizon; the rest is consent._apply_dataguard_past_horizon.';

revoke all on function consent._apply_dataguard(jsonb, bigint, boolean) from public;
revoke all on function consent._apply_dataguard_past_horizon(jsonb, bigint, boolean) from public;
