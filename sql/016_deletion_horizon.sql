-- 016_deletion_horizon.sql — a deletion keeps ruling after the user is revived, in every regulation.
--
-- PRODUCT §4: user.deleted "leaves a tombstone so a late older delivery cannot bring the user back", and
-- only a strictly newer user snapshot revives the user. Until now the tombstone was deleted_at alone, and
-- a revival cleared it: after a deletion and a newer gdpr snapshot, a late cpra snapshot or event older
-- than the deletion found no tombstone and no cpra snapshot, and restored pre-deletion cpra state. And a
-- deletion that arrived after a newer snapshot of another regulation was refused as a whole, so the
-- older regulation's pre-deletion state stayed; in the other arrival order it was removed.
--
-- users.last_deleted_at is the deletion horizon: the newest deletion of the user (by the source, or by a
-- reconciliation that found the user gone). It is never cleared and never moves back; a trigger keeps it
-- covering every tombstone whoever writes deleted_at (the apply path, reconciliation). A Didomi user
-- snapshot or event not newer than it is stale, revived user or not. Users deleted and revived before
-- this migration get it from the history (the removals their deletion caused).
--
-- users.revived_at is the time of the snapshot that lifted the last tombstone: the user was deleted
-- between the two, so an event of that time is stale, in any regulation.
--
-- A deletion older than a stored snapshot of the user (the user was restated after it) now leaves what
-- a deletion arriving first would have left: it removes what was seen at or before the deletion (as for
-- the horizon: whatever the tie) and what events set between the deletion and the first newer snapshot,
-- in every regulation, dates rows restated since by their snapshot, and keeps the user. A
-- deletion that tombstones the user also removes rows set by events after it (they arrived first; only a
-- newer snapshot revives a deleted user), and records that removal at the row's own time too, so that
-- consents_as_of(now()) agrees with current_consents.
--
-- Released migrations are not edited: the snapshot guard wraps 009's function (renamed), the event and
-- deletion rules are redefined whole.

alter table consent.users add column last_deleted_at timestamptz;
comment on column consent.users.last_deleted_at is 'Deletion horizon: the newest deletion of the user (kept when a newer snapshot revives the user). A Didomi delivery not newer than it is stale.';
alter table consent.users add column revived_at timestamptz;
comment on column consent.users.revived_at is 'Source-side time of the user snapshot that revived the user after its last deletion; a Didomi event between the deletion and it does not count.';
update consent.users set last_deleted_at = deleted_at where deleted_at is not null;
-- A user deleted and revived before this migration has deleted_at cleared; its deletion is still in the
-- history, as the removals it caused.
with deletions as (
    select h.tenant_id, h.user_id, max(h.changed_at) as at
      from (select tenant_id, user_id, changed_at from consent.consent_history
             where source = 'didomi' and cause like 'didomi:user.deleted:%'
            union all
            select tenant_id, user_id, changed_at from consent.preference_history
             where source = 'didomi' and cause like 'didomi:user.deleted:%') h
     group by h.tenant_id, h.user_id
)
update consent.users u
   set last_deleted_at = greatest(u.last_deleted_at, d.at)
  from deletions d
 where u.source = 'didomi' and u.tenant_id = d.tenant_id and u.user_id = d.user_id;
update consent.users u
   set revived_at = (select min(s.updated_at) from consent.user_snapshots s
                      where s.source = u.source and s.tenant_id = u.tenant_id and s.user_id = u.user_id
                        and s.updated_at > u.last_deleted_at)
 where u.source = 'didomi' and u.deleted_at is null and u.last_deleted_at is not null;

create function consent._keep_deletion_horizon() returns trigger language plpgsql as $$
begin
    new.last_deleted_at := greatest(new.last_deleted_at, new.deleted_at);
    if tg_op = 'UPDATE' then
        new.last_deleted_at := greatest(new.last_deleted_at, old.last_deleted_at, old.deleted_at);
    end if;
    return new;
end
$$;
comment on function consent._keep_deletion_horizon() is 'Keeps users.last_deleted_at at or after every deleted_at the row has had.';
revoke all on function consent._keep_deletion_horizon() from public;

-- WHEN clauses keep the hot path (snapshots of live users) free of any trigger call.
create trigger users_deletion_horizon_insert before insert on consent.users
    for each row when (new.deleted_at is not null) execute function consent._keep_deletion_horizon();
create trigger users_deletion_horizon_update before update of deleted_at, last_deleted_at on consent.users
    for each row when (old.deleted_at is distinct from new.deleted_at
                       or old.last_deleted_at is distinct from new.last_deleted_at)
    execute function consent._keep_deletion_horizon();

-- Didomi user snapshots: the horizon first, then 009's guards and apply for the rest.
alter function consent._apply_didomi_snapshots(consent.batch_user[]) rename to _apply_didomi_snapshots_past_horizon;
comment on function consent._apply_didomi_snapshots_past_horizon(consent.batch_user[]) is 'Didomi user snapshots already checked against the deletion horizon: version and tombstone guards, then the snapshot rule (009).';

create function consent._apply_didomi_snapshots(p_rows consent.batch_user[])
returns table (pos integer, outcome text, reason text)
language plpgsql
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_stale_pos    integer[];
    v_stale_reason text[];
    v_past         consent.batch_user[];
    v_after        consent.batch_user[];
begin
    select array_agg((x.d).pos) filter (where (x.d).at <= x.horizon),
           array_agg(format('user was deleted at %s; this snapshot (updated_at %s) is not newer', x.horizon, (x.d).at))
               filter (where (x.d).at <= x.horizon),
           array_agg(x.d) filter (where x.horizon is null or (x.d).at > x.horizon),
           array_agg(x.d) filter (where (x.d).at > x.horizon)
      into v_stale_pos, v_stale_reason, v_past, v_after
      from (select d, u.last_deleted_at as horizon
              from unnest(p_rows) d
              left join lateral (select u.last_deleted_at from consent.users u
                                  where u.source = 'didomi' and u.tenant_id = d.tenant_id and u.user_id = d.user_id
                                 offset 0) u on true) x;

    if v_stale_pos is not null then
        return query select unnest(v_stale_pos), 'stale'::text, unnest(v_stale_reason);
    end if;
    if v_past is not null then
        return query select * from consent._apply_didomi_snapshots_past_horizon(v_past);
    end if;

    -- The revival is the earliest snapshot applied after the last deletion, in any regulation, whatever
    -- order they arrived in: events between the deletion and it do not count.
    if v_after is not null then
        update consent.users u
           set revived_at = case when u.revived_at > u.last_deleted_at then least(u.revived_at, d.at) else d.at end
          from unnest(v_after) d
         where u.source = 'didomi' and u.tenant_id = d.tenant_id and u.user_id = d.user_id and u.deleted_at is null
           and exists (select 1 from consent.user_snapshots s
                        where s.source = 'didomi' and s.tenant_id = d.tenant_id and s.user_id = d.user_id
                          and s.regulation = d.regulation and s.updated_at = d.at);
    end if;
end
$$;
comment on function consent._apply_didomi_snapshots(consent.batch_user[]) is 'Didomi user snapshots of distinct users: stale when not newer than the deletion horizon, else consent._apply_didomi_snapshots_past_horizon.';
revoke all on function consent._apply_didomi_snapshots(consent.batch_user[]) from public;

-- Didomi events: 015's rule, plus the deletion horizon at the event's effective time.
create or replace function consent._apply_didomi_event(d jsonb, p_delivery bigint, out outcome text, out reason text)
language plpgsql as $$
#variable_conflict use_column
declare
    e          jsonb := d->'event';
    v_type     text := d->>'type';
    v_tenant   text := d->>'tenant';
    v_user     text := d->>'user';
    v_reg      text := d->>'regulation';
    v_id       text := e->>'id';
    v_status   text := e->>'status';
    v_old      text := e->>'old_status';
    v_created  timestamptz := (e->>'created_at')::timestamptz;
    v_updated  timestamptz := coalesce((e->>'updated_at')::timestamptz, (e->>'created_at')::timestamptz);
    s_status   text;
    s_updated  timestamptz;
    s_deleted  boolean;
    v_snapshot timestamptz;
    v_version  bigint;
    v_prior    text;
    v_at       timestamptz;
    v_deleted  timestamptz;
    v_horizon  timestamptz;
    v_revived  timestamptz;
    v_changed  integer;
    v_choices  integer := jsonb_array_length(coalesce(d->'items', '[]')) + jsonb_array_length(coalesce(d->'prefs', '[]'));
begin
    select ev.status, ev.updated_at, ev.deleted into s_status, s_updated, s_deleted
      from consent.didomi_events ev
     where ev.tenant_id = v_tenant and ev.user_id = v_user and ev.event_id = v_id;

    -- Record the event as last seen (the newest version of it wins; a deletion sticks).
    insert into consent.didomi_events as ev
           (tenant_id, user_id, event_id, regulation, status, created_at, updated_at, deleted, consents,
            proofs_id, delegate, last_delivery_id)
    values (v_tenant, v_user, v_id, v_reg, v_status, v_created, v_updated, v_type = 'event.deleted',
            e->'consents', array(select jsonb_array_elements_text(coalesce(e->'proofs_id', '[]'))),
            e->'delegate', p_delivery)
    on conflict (tenant_id, user_id, event_id) do update
       set status           = case when excluded.updated_at >= coalesce(ev.updated_at, '-infinity')
                                   then excluded.status else ev.status end,
           updated_at       = greatest(ev.updated_at, excluded.updated_at),
           consents         = case when excluded.updated_at >= coalesce(ev.updated_at, '-infinity')
                                   then excluded.consents else ev.consents end,
           proofs_id        = case when excluded.updated_at >= coalesce(ev.updated_at, '-infinity')
                                   then excluded.proofs_id else ev.proofs_id end,
           delegate         = coalesce(excluded.delegate, ev.delegate),
           deleted          = ev.deleted or excluded.deleted,
           last_delivery_id = excluded.last_delivery_id;

    if v_type = 'event.deleted' then
        outcome := 'applied';
        reason := 'event recorded as deleted; the user.updated that follows carries the recomputed state';
        return;
    end if;
    if v_status is distinct from 'confirmed' then
        outcome := 'applied';
        reason := format('event is %s: recorded, no state change until it is confirmed', coalesce(v_status, 'without status'));
        return;
    end if;

    if v_type = 'event.updated' then
        -- What the event was before this update: the payload's old_entity, else what we stored.
        v_prior := coalesce(v_old, case when s_updated is null or s_updated < v_updated then s_status end);
        if v_prior = 'confirmed' then
            outcome := 'applied';
            reason := 'update of an already-confirmed event: recorded, no state change';
            return;
        elsif v_prior is not null then
            v_at := v_updated;           -- a confirmation takes effect when it happened
        else
            v_at := v_created;           -- nothing known about the prior status: the event's own time
        end if;
    else
        v_at := v_created;
    end if;

    if s_deleted then
        outcome := 'stale';
        reason := format('event %s was deleted at the source; the user.updated that follows carries the recomputed state', v_id);
        return;
    end if;

    select u.deleted_at, u.last_deleted_at, u.revived_at into v_deleted, v_horizon, v_revived
      from consent.users u where u.source = 'didomi' and u.tenant_id = v_tenant and u.user_id = v_user;
    if v_deleted is not null then
        outcome := 'stale';
        reason := format('user was deleted at %s; only a newer user snapshot revives it', v_deleted);
        return;
    end if;
    if v_at <= v_horizon then
        outcome := 'stale';
        reason := format('event %s (effective %s) is not newer than the user''s deletion at %s', v_id, v_at, v_horizon);
        return;
    end if;
    if v_at < v_revived then
        outcome := 'stale';
        reason := format('event %s (effective %s) happened while the user was deleted (deleted at %s, revived by a user snapshot at %s)',
                         v_id, v_at, v_horizon, v_revived);
        return;
    end if;

    -- A user snapshot is the user's full merged state at its updated_at: an event not newer than it is
    -- already in it, including a purpose the snapshot no longer carries (on a tie the snapshot wins, as
    -- for rows: its tie key sorts after an event's).
    select s.updated_at, s.version into v_snapshot, v_version
      from consent.user_snapshots s
     where s.source = 'didomi' and s.tenant_id = v_tenant and s.user_id = v_user and s.regulation = v_reg;
    if v_at <= v_snapshot then
        outcome := 'stale';
        reason := format('event %s (effective %s) is not newer than the stored %s user state (version %s, updated_at %s), which includes it',
                         v_id, v_at, v_reg, v_version, v_snapshot);
        return;
    end if;

    v_changed := consent._upsert_consents('didomi', v_tenant, v_user, v_reg, d->'items', v_at, v_at,
                                          'event:' || v_id, 'didomi:event:' || v_id, false, p_delivery)
               + consent._upsert_preferences('didomi', v_tenant, v_user, v_reg, d->'prefs', v_at, v_at,
                                             'event:' || v_id, 'didomi:event:' || v_id, false, p_delivery);
    if v_choices > 0 and v_changed = 0 then
        outcome := 'stale';
        reason := format('every choice of event %s (effective %s) is older than the stored state', v_id, v_at);
        return;
    end if;
    perform consent._upsert_user('didomi', v_tenant, v_user, d->'user_info', v_at, false, false, p_delivery);
    outcome := 'applied';
end
$$;

-- Didomi user.deleted.
create or replace function consent._apply_didomi_user_deleted(d jsonb, p_delivery bigint, out outcome text, out reason text)
language plpgsql as $$
#variable_conflict use_column
declare
    v_tenant   text := d->>'tenant';
    v_user     text := d->>'user';
    v_at       timestamptz := (d->>'at')::timestamptz;
    v_cause    text := d->>'cause';
    v_tie      text := d->>'tie';
    v_horizon  timestamptz;
    v_restated text;
    v_revived  timestamptz;
begin
    select u.last_deleted_at into v_horizon
      from consent.users u where u.source = 'didomi' and u.tenant_id = v_tenant and u.user_id = v_user;
    if v_at <= v_horizon then
        outcome := 'stale';
        reason := format('user already deleted at %s', v_horizon);
        return;
    end if;

    -- Snapshots newer than the deletion: the user was restated after it, and the first one revived it.
    select string_agg(format('%s at %s', s.regulation, s.updated_at), ', ' order by s.regulation), min(s.updated_at)
      into v_restated, v_revived
      from consent.user_snapshots s
     where s.source = 'didomi' and s.tenant_id = v_tenant and s.user_id = v_user and s.updated_at > v_at;

    if v_restated is not null then
        -- The source restated the user after this deletion, and the first such snapshot revived it.
        -- What a deletion arriving first would have left is kept, the rest goes: state seen at or
        -- before the deletion (as for the horizon, whatever the tie: a secondary key of infinity makes
        -- the row-key comparison exactly that, and sorts the removal after anything else recorded at
        -- the deletion's time), and state set between the deletion and the revival, which would have
        -- been stale. Rows a newer snapshot restated unchanged are dated by that snapshot.
        perform consent._remove_consents('didomi', v_tenant, v_user, null, null, null, v_at, 'infinity', v_tie, v_cause, true, p_delivery);
        perform consent._remove_preferences('didomi', v_tenant, v_user, null, null, v_at, 'infinity', v_tie, v_cause, true, p_delivery);
        delete from consent.user_snapshots s
         where s.source = 'didomi' and s.tenant_id = v_tenant and s.user_id = v_user and s.updated_at <= v_at;

        -- Rows still dated before the revival: set by an event between the deletion and the revival
        -- (removed, unless a newer snapshot of their regulation restated them), or dating from before
        -- the deletion and restated since. Each ends at the deletion, and at its own time when that is
        -- later (so the history agrees with either arrival order); a restated one begins again at its
        -- regulation's snapshot.
        with early as (
            select c.regulation, c.item_kind, c.item_id, c.lawful_basis, c.status, c.valid_from, c.valid_until,
                   c.changed_at, c.seen_at, c.seen_at2, c.seen_tie, c.delivery_id, s.updated_at as began,
                   format('didomi:user:%s@v%s', v_user, s.version) as began_by
              from consent.consents c
              left join consent.user_snapshots s   -- the snapshot restated the row (a vendor row it left alone: not)
                on s.source = c.source and s.tenant_id = c.tenant_id and s.user_id = c.user_id
               and s.regulation = c.regulation and c.seen_at >= s.updated_at
             where c.source = 'didomi' and c.tenant_id = v_tenant and c.user_id = v_user and c.changed_at < v_revived
        ),
        logged as (
            insert into consent.consent_history
                   (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status,
                    previous_status, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause,
                    delivery_id)
            select 'didomi', v_tenant, v_user, h.regulation, h.item_kind, h.item_id, h.lawful_basis, h.status,
                   h.previous_status, h.valid_from, h.valid_until, h.changed_at, h.seen_at, h.seen_at2, h.seen_tie,
                   h.cause, h.delivery_id
              from (select 1 as step, r.regulation, r.item_kind, r.item_id, r.lawful_basis, null as status,
                           r.status as previous_status, null::timestamptz as valid_from, null::timestamptz as valid_until,
                           v_at as changed_at, v_at as seen_at, 'infinity'::timestamptz as seen_at2,
                           v_tie collate "C" as seen_tie, v_cause as cause, p_delivery as delivery_id
                      from early r
                    union all
                    select 2, r.regulation, r.item_kind, r.item_id, r.lawful_basis, null, r.status, null, null,
                           r.changed_at, r.changed_at, 'infinity', v_tie, v_cause, p_delivery
                      from early r
                     where r.changed_at > v_at
                    union all
                    select 3, r.regulation, r.item_kind, r.item_id, r.lawful_basis, r.status, null, r.valid_from,
                           r.valid_until, r.began, r.seen_at, r.seen_at2, r.seen_tie, r.began_by, r.delivery_id
                      from early r
                     where r.began is not null) h
             order by h.step, h.regulation, h.item_kind, h.item_id, h.lawful_basis
        ),
        gone as (
            delete from consent.consents c
             using early r
             where c.source = 'didomi' and c.tenant_id = v_tenant and c.user_id = v_user
               and c.regulation = r.regulation and c.item_kind = r.item_kind and c.item_id = r.item_id
               and c.lawful_basis = r.lawful_basis and r.began is null
        )
        update consent.consents c
           set changed_at = r.began, cause = r.began_by
          from early r
         where c.source = 'didomi' and c.tenant_id = v_tenant and c.user_id = v_user
           and c.regulation = r.regulation and c.item_kind = r.item_kind and c.item_id = r.item_id
           and c.lawful_basis = r.lawful_basis and r.began is not null;

        with early as (
            select p.regulation, p.purpose_id, p.preference_id, p.value_ids, p.changed_at, p.seen_at, p.seen_at2,
                   p.seen_tie, p.delivery_id, s.updated_at as began,
                   format('didomi:user:%s@v%s', v_user, s.version) as began_by
              from consent.preferences p
              left join consent.user_snapshots s
                on s.source = p.source and s.tenant_id = p.tenant_id and s.user_id = p.user_id
               and s.regulation = p.regulation and p.seen_at >= s.updated_at
             where p.source = 'didomi' and p.tenant_id = v_tenant and p.user_id = v_user and p.changed_at < v_revived
        ),
        logged as (
            insert into consent.preference_history
                   (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids,
                    previous_value_ids, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
            select 'didomi', v_tenant, v_user, h.regulation, h.purpose_id, h.preference_id, h.value_ids,
                   h.previous_value_ids, h.changed_at, h.seen_at, h.seen_at2, h.seen_tie, h.cause, h.delivery_id
              from (select 1 as step, r.regulation, r.purpose_id, r.preference_id, null::text[] as value_ids,
                           r.value_ids as previous_value_ids, v_at as changed_at, v_at as seen_at,
                           'infinity'::timestamptz as seen_at2, v_tie collate "C" as seen_tie, v_cause as cause,
                           p_delivery as delivery_id
                      from early r
                    union all
                    select 2, r.regulation, r.purpose_id, r.preference_id, null, r.value_ids, r.changed_at,
                           r.changed_at, 'infinity', v_tie, v_cause, p_delivery
                      from early r
                     where r.changed_at > v_at
                    union all
                    select 3, r.regulation, r.purpose_id, r.preference_id, r.value_ids, null, r.began, r.seen_at,
                           r.seen_at2, r.seen_tie, r.began_by, r.delivery_id
                      from early r
                     where r.began is not null) h
             order by h.step, h.regulation, h.purpose_id, h.preference_id
        ),
        gone as (
            delete from consent.preferences p
             using early r
             where p.source = 'didomi' and p.tenant_id = v_tenant and p.user_id = v_user
               and p.regulation = r.regulation and p.purpose_id = r.purpose_id and p.preference_id = r.preference_id
               and r.began is null
        )
        update consent.preferences p
           set changed_at = r.began, cause = r.began_by
          from early r
         where p.source = 'didomi' and p.tenant_id = v_tenant and p.user_id = v_user
           and p.regulation = r.regulation and p.purpose_id = r.purpose_id and p.preference_id = r.preference_id
           and r.began is not null;

        update consent.users u
           set last_deleted_at = v_at,
               revived_at = v_revived,
               version = (select max(s.version) from consent.user_snapshots s
                           where s.source = 'didomi' and s.tenant_id = v_tenant and s.user_id = v_user),
               last_delivery_id = p_delivery
         where u.source = 'didomi' and u.tenant_id = v_tenant and u.user_id = v_user;
        outcome := 'applied';
        reason := format('the user was restated after this deletion (user snapshot %s): state older than the deletion removed, the user kept', v_restated);
        return;
    end if;

    -- Tombstone. Rows set by events after the deletion (they arrived first) go too; their removal is also
    -- recorded at their own time, or the history (consents_as_of) would still find them in force.
    insert into consent.consent_history
           (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, previous_status,
            valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
    select c.source, c.tenant_id, c.user_id, c.regulation, c.item_kind, c.item_id, c.lawful_basis, null, c.status,
           null, null, c.changed_at, c.seen_at, c.seen_at2, c.seen_tie, v_cause, p_delivery
      from consent.consents c
     where c.source = 'didomi' and c.tenant_id = v_tenant and c.user_id = v_user and c.changed_at > v_at;
    insert into consent.preference_history
           (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids, previous_value_ids,
            changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
    select p.source, p.tenant_id, p.user_id, p.regulation, p.purpose_id, p.preference_id, null, p.value_ids,
           p.changed_at, p.seen_at, p.seen_at2, p.seen_tie, v_cause, p_delivery
      from consent.preferences p
     where p.source = 'didomi' and p.tenant_id = v_tenant and p.user_id = v_user and p.changed_at > v_at;
    -- The secondary key of infinity sorts these removals after anything recorded at the deletion's time
    -- (a snapshot dated exactly then, with a higher version).
    perform consent._remove_consents('didomi', v_tenant, v_user, null, null, null, v_at, 'infinity', v_tie, v_cause, false, p_delivery);
    perform consent._remove_preferences('didomi', v_tenant, v_user, null, null, v_at, 'infinity', v_tie, v_cause, false, p_delivery);
    delete from consent.user_snapshots s
     where s.source = 'didomi' and s.tenant_id = v_tenant and s.user_id = v_user;

    insert into consent.users as u (source, tenant_id, user_id, created_at, updated_at, version, deleted_at,
                                    deleted_version, last_delivery_id)
    values ('didomi', v_tenant, v_user, (d->'user_info'->>'created_at')::timestamptz, v_at,
            (d->'user_info'->>'version')::bigint, v_at, (d->'user_info'->>'version')::bigint, p_delivery)
    on conflict (source, tenant_id, user_id) do update
       set external_ref = null, external_ref_type = null, country = null, last_seen_country = null,
           metadata = null,
           updated_at = greatest(u.updated_at, excluded.updated_at),
           version = coalesce(excluded.version, u.version),
           deleted_at = excluded.deleted_at,
           deleted_version = excluded.deleted_version,
           last_delivery_id = excluded.last_delivery_id;
    outcome := 'applied';
end
$$;
