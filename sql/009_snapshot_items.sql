-- 009_snapshot_items.sql — the consent and preference rows of Didomi user snapshots, in one pass.
--
-- 008 applied a batch's snapshot items with an upsert (a lookup per item for the previous state, then
-- a speculative insert that probes the key again) and a second statement that looked up each user's
-- rows once more to find removals. Here each user's stored rows (of the snapshot's regulation) are
-- read once, by one range scan of the primary key, and that one read decides everything: an item with
-- no stored row is inserted (plain insert), a stored row older than the item is updated in place by
-- row address, a stored row the snapshot no longer carries and older than it is deleted by row
-- address, and every change is appended to the history in one insert — one statement per table.
--
-- A plain insert is safe because every writer of a user's rows (apply_batch, replay, reconciliation)
-- holds that user's advisory lock first; should one ever race anyway, the unique key refuses the
-- batch and the agent applies its deliveries one by one.
--
-- Same rules, outcomes and history rows as before (008): the ordering guard, a restated unchanged row
-- keeps its changed_at and cause, removals only of the replaced kinds and only when older than the
-- snapshot. History rows keep 008's order: upserts by (delivery, kind, id, basis), then removals
-- (delivery ids are allocated in arrival order, so they order a batch as its positions do).

-- One change set as a batch_user row, as 008's, without a subquery in its body: PostgreSQL inlines
-- an SQL function only when its body has none, and a function that is not inlined runs an executor
-- per row. jsonb_populate_record turns the JSON array of replaced kinds into text[] (NULL when absent).
create or replace function consent._batch_user(p_change jsonb, p_pos integer, p_delivery bigint)
returns consent.batch_user language sql stable as $$
    select row(p_pos, p_delivery, p_change->>'tenant', p_change->>'user', p_change->>'regulation',
               p_change->>'key', (p_change->'user_info'->>'version')::bigint, (p_change->>'at')::timestamptz,
               p_change->>'tie', p_change->>'cause', p_change->'user_info', p_change->'items', p_change->'prefs',
               (jsonb_populate_record(null::consent.batch_user,
                                      jsonb_build_object('replaces', p_change->'replaces'))).replaces
              )::consent.batch_user
$$;

-- Consent rows of applied snapshots (distinct users), with their history.
create function consent._apply_snapshot_consents(v_apply consent.batch_user[])
returns void
language plpgsql
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    with incoming as (
        select distinct on (d.pos, x.kind, x.id, x.basis)
               d.pos, d.tenant_id, d.user_id, d.regulation, d.delivery_id,
               x.kind, x.id, x.basis, x.status, x.raw, x.option_type, x.valid_from, x.valid_until,
               coalesce(x.at, d.at) as at,
               coalesce(x.at2, x.at, d.at) as at2,
               coalesce(x.tie, d.tie) collate "C" as tie,
               coalesce(x.cause, d.cause) as cause,
               x.provenance
          from unnest(v_apply) d,
               jsonb_to_recordset(coalesce(d.items, '[]')) as x(
                   kind text, id text, basis text, status text, raw text, option_type text,
                   valid_from timestamptz, valid_until timestamptz, at timestamptz, at2 timestamptz,
                   tie text, cause text, provenance jsonb)
         order by d.pos, x.kind, x.id, x.basis, 14 desc, 15 desc, 16 desc
    ),
    stored as (
        select d.pos, d.at as snap_at, d.tie collate "C" as snap_tie, d.cause as snap_cause,
               d.delivery_id as snap_delivery,
               c.item_kind = any (coalesce(d.replaces, array['purpose', 'vendor'])) as replaceable, c.*
          from unnest(v_apply) d
          cross join lateral (
              select c.ctid as tid, c.tenant_id, c.user_id, c.regulation, c.item_kind, c.item_id,
                     c.lawful_basis, c.status, c.valid_from, c.valid_until, c.seen_at, c.seen_at2, c.seen_tie
                from consent.consents c
               where c.source = 'didomi' and c.tenant_id = d.tenant_id and c.user_id = d.user_id
                 and c.regulation = d.regulation
              offset 0) c
    ),
    matched as (
        select i.*, s.tid, s.status as p_status, s.valid_from as p_valid_from, s.valid_until as p_valid_until,
               (i.at, i.at2, i.tie) > (s.seen_at, s.seen_at2, s.seen_tie) as newer
          from incoming i
          left join stored s
            on s.pos = i.pos and s.item_kind = i.kind and s.item_id = i.id and s.lawful_basis = i.basis
    ),
    inserted as (
        insert into consent.consents
               (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, raw_status,
                option_type, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause,
                provenance, delivery_id)
        select 'didomi', m.tenant_id, m.user_id, m.regulation, m.kind, m.id, m.basis, m.status, m.raw,
               m.option_type, m.valid_from, m.valid_until, m.at, m.at, m.at2, m.tie, m.cause,
               m.provenance, m.delivery_id
          from matched m
         where m.tid is null
        returning tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, valid_from,
                  valid_until, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id
    ),
    updated as (
        update consent.consents c
           set status      = m.status,
               raw_status  = m.raw,
               option_type = m.option_type,
               valid_from  = m.valid_from,
               valid_until = m.valid_until,
               changed_at  = case when c.status = m.status
                                   and c.valid_from is not distinct from m.valid_from
                                   and c.valid_until is not distinct from m.valid_until
                                  then c.changed_at else m.at end,
               cause       = case when c.status = m.status
                                   and c.valid_from is not distinct from m.valid_from
                                   and c.valid_until is not distinct from m.valid_until
                                  then c.cause else m.cause end,
               seen_at     = m.at,
               seen_at2    = m.at2,
               seen_tie    = m.tie,
               provenance  = coalesce(m.provenance, c.provenance),
               delivery_id = m.delivery_id,
               written_at  = now()
          from matched m
         where c.ctid = m.tid and m.newer
        returning m.p_status, m.p_valid_from, m.p_valid_until, c.tenant_id, c.user_id, c.regulation,
                  c.item_kind, c.item_id, c.lawful_basis, c.status, c.valid_from, c.valid_until, c.changed_at,
                  c.seen_at, c.seen_at2, c.seen_tie, c.cause, c.delivery_id
    ),
    removed as (
        delete from consent.consents c
         using stored s
         where c.ctid = s.tid and s.replaceable
           and (s.seen_at, s.seen_at2, s.seen_tie) < (s.snap_at, s.snap_at, s.snap_tie)
           and not exists (select 1 from incoming i
                            where i.pos = s.pos and i.kind = s.item_kind and i.id = s.item_id
                              and i.basis = s.lawful_basis)
        returning s.snap_at, s.snap_tie, s.snap_cause, s.snap_delivery, c.tenant_id, c.user_id,
                  c.regulation, c.item_kind, c.item_id, c.lawful_basis, c.status
    )
    insert into consent.consent_history
           (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status,
            previous_status, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
    select 'didomi', h.tenant_id, h.user_id, h.regulation, h.item_kind, h.item_id, h.lawful_basis, h.status,
           h.previous_status, h.valid_from, h.valid_until, h.changed_at, h.seen_at, h.seen_at2, h.seen_tie,
           h.cause, h.delivery_id
      from (select false as removal, i.tenant_id, i.user_id, i.regulation, i.item_kind, i.item_id,
                   i.lawful_basis, i.status, null::text as previous_status, i.valid_from, i.valid_until,
                   i.changed_at, i.seen_at, i.seen_at2, i.seen_tie, i.cause, i.delivery_id
              from inserted i
            union all
            select false, u.tenant_id, u.user_id, u.regulation, u.item_kind, u.item_id, u.lawful_basis,
                   u.status, u.p_status, u.valid_from, u.valid_until, u.changed_at, u.seen_at, u.seen_at2,
                   u.seen_tie, u.cause, u.delivery_id
              from updated u
             where u.p_status is distinct from u.status
                or u.p_valid_from is distinct from u.valid_from
                or u.p_valid_until is distinct from u.valid_until
            union all
            select true, r.tenant_id, r.user_id, r.regulation, r.item_kind, r.item_id, r.lawful_basis,
                   null, r.status, null, null, r.snap_at, r.snap_at, r.snap_at, r.snap_tie, r.snap_cause,
                   r.snap_delivery
              from removed r) h
     order by h.removal, h.delivery_id, h.item_kind, h.item_id, h.lawful_basis;
end
$$;

-- Preference rows of applied snapshots (distinct users), with their history.
create function consent._apply_snapshot_preferences(v_apply consent.batch_user[])
returns void
language plpgsql
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    with incoming as (
        select distinct on (d.pos, coalesce(x.purpose, ''), x.pref)
               d.pos, d.tenant_id, d.user_id, d.regulation, d.delivery_id,
               coalesce(x.purpose, '') as purpose, x.pref,
               array(select jsonb_array_elements_text(x."values") order by 1) as value_ids,
               coalesce(x.at, d.at) as at,
               coalesce(x.at2, x.at, d.at) as at2,
               coalesce(x.tie, d.tie) collate "C" as tie,
               coalesce(x.cause, d.cause) as cause,
               x.provenance
          from unnest(v_apply) d,
               jsonb_to_recordset(coalesce(d.prefs, '[]')) as x(
                   purpose text, pref text, "values" jsonb, at timestamptz, at2 timestamptz, tie text,
                   cause text, provenance jsonb)
         order by d.pos, coalesce(x.purpose, ''), x.pref, 9 desc, 10 desc, 11 desc
    ),
    stored as (
        select d.pos, d.at as snap_at, d.tie collate "C" as snap_tie, d.cause as snap_cause,
               d.delivery_id as snap_delivery, p.*
          from unnest(v_apply) d
          cross join lateral (
              select p.ctid as tid, p.tenant_id, p.user_id, p.regulation, p.purpose_id, p.preference_id,
                     p.value_ids, p.seen_at, p.seen_at2, p.seen_tie
                from consent.preferences p
               where p.source = 'didomi' and p.tenant_id = d.tenant_id and p.user_id = d.user_id
                 and p.regulation = d.regulation
              offset 0) p
    ),
    matched as (
        select i.*, s.tid, s.value_ids as p_value_ids,
               (i.at, i.at2, i.tie) > (s.seen_at, s.seen_at2, s.seen_tie) as newer
          from incoming i
          left join stored s on s.pos = i.pos and s.purpose_id = i.purpose and s.preference_id = i.pref
    ),
    inserted as (
        insert into consent.preferences
               (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids, changed_at,
                seen_at, seen_at2, seen_tie, cause, provenance, delivery_id)
        select 'didomi', m.tenant_id, m.user_id, m.regulation, m.purpose, m.pref, m.value_ids, m.at, m.at,
               m.at2, m.tie, m.cause, m.provenance, m.delivery_id
          from matched m
         where m.tid is null
        returning tenant_id, user_id, regulation, purpose_id, preference_id, value_ids, changed_at, seen_at,
                  seen_at2, seen_tie, cause, delivery_id
    ),
    updated as (
        update consent.preferences p
           set value_ids   = m.value_ids,
               changed_at  = case when p.value_ids = m.value_ids then p.changed_at else m.at end,
               cause       = case when p.value_ids = m.value_ids then p.cause else m.cause end,
               seen_at     = m.at,
               seen_at2    = m.at2,
               seen_tie    = m.tie,
               provenance  = coalesce(m.provenance, p.provenance),
               delivery_id = m.delivery_id,
               written_at  = now()
          from matched m
         where p.ctid = m.tid and m.newer
        returning m.p_value_ids, p.tenant_id, p.user_id, p.regulation, p.purpose_id, p.preference_id,
                  p.value_ids, p.changed_at, p.seen_at, p.seen_at2, p.seen_tie, p.cause, p.delivery_id
    ),
    removed as (
        delete from consent.preferences p
         using stored s
         where p.ctid = s.tid
           and (s.seen_at, s.seen_at2, s.seen_tie) < (s.snap_at, s.snap_at, s.snap_tie)
           and not exists (select 1 from incoming i
                            where i.pos = s.pos and i.purpose = s.purpose_id and i.pref = s.preference_id)
        returning s.snap_at, s.snap_tie, s.snap_cause, s.snap_delivery, p.tenant_id, p.user_id, p.regulation,
                  p.purpose_id, p.preference_id, p.value_ids
    )
    insert into consent.preference_history
           (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids,
            previous_value_ids, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
    select 'didomi', h.tenant_id, h.user_id, h.regulation, h.purpose_id, h.preference_id, h.value_ids,
           h.previous_value_ids, h.changed_at, h.seen_at, h.seen_at2, h.seen_tie, h.cause, h.delivery_id
      from (select false as removal, i.tenant_id, i.user_id, i.regulation, i.purpose_id, i.preference_id,
                   i.value_ids, null::text[] as previous_value_ids, i.changed_at, i.seen_at, i.seen_at2,
                   i.seen_tie, i.cause, i.delivery_id
              from inserted i
            union all
            select false, u.tenant_id, u.user_id, u.regulation, u.purpose_id, u.preference_id, u.value_ids,
                   u.p_value_ids, u.changed_at, u.seen_at, u.seen_at2, u.seen_tie, u.cause, u.delivery_id
              from updated u
             where u.p_value_ids is distinct from u.value_ids
            union all
            select true, r.tenant_id, r.user_id, r.regulation, r.purpose_id, r.preference_id, null,
                   r.value_ids, r.snap_at, r.snap_at, r.snap_at, r.snap_tie, r.snap_cause, r.snap_delivery
              from removed r) h
     order by h.removal, h.delivery_id, h.purpose_id, h.preference_id;
end
$$;

-- 008's snapshot rule, its consent and preference steps handed to the functions above.
create or replace function consent._apply_didomi_snapshots(p_rows consent.batch_user[])
returns table (pos integer, outcome text, reason text)
language plpgsql
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_apply consent.batch_user[] := '{}';
    r       record;
begin
    -- Guards: a tombstone not older than the snapshot, or a stored snapshot at least as new.
    for r in
        select d,
               case when u.deleted_at is not null and d.at <= u.deleted_at then
                        format('user was deleted at %s; this snapshot (updated_at %s) is not newer', u.deleted_at, d.at)
                    when s.version is not null
                     and (d.version < s.version or (d.version = s.version and d.at <= s.updated_at)) then
                        format('stored %s state is version %s (updated_at %s); this snapshot is version %s (updated_at %s)',
                               d.regulation, s.version, s.updated_at, d.version, d.at)
               end as why
          from unnest(p_rows) d
          left join lateral (select u.deleted_at from consent.users u
                              where u.source = 'didomi' and u.tenant_id = d.tenant_id and u.user_id = d.user_id
                             offset 0) u on true
          left join lateral (select s.version, s.updated_at from consent.user_snapshots s
                              where s.source = 'didomi' and s.tenant_id = d.tenant_id and s.user_id = d.user_id
                                and s.regulation = d.regulation
                             offset 0) s on true
    loop
        if r.why is null then
            v_apply := v_apply || r.d;
        else
            pos := (r.d).pos; outcome := 'stale'; reason := r.why;
            return next;
        end if;
    end loop;
    if cardinality(v_apply) = 0 then return; end if;

    insert into consent.user_snapshots as s (source, tenant_id, user_id, regulation, version, updated_at, delivery_id)
    select 'didomi', d.tenant_id, d.user_id, d.regulation, d.version, d.at, d.delivery_id from unnest(v_apply) d
    on conflict (source, tenant_id, user_id, regulation) do update
       set version = excluded.version, updated_at = excluded.updated_at, delivery_id = excluded.delivery_id;

-- The user row: authoritative (a full record), and a newer snapshot revives a tombstone.
    insert into consent.users as u
           (source, tenant_id, user_id, external_ref, external_ref_type, country, last_seen_country, metadata,
            created_at, updated_at, version, last_delivery_id)
    select 'didomi', d.tenant_id, d.user_id, d.info->>'external_ref', d.info->>'external_ref_type',
           d.info->>'country', d.info->>'last_seen_country', d.info->'metadata',
           (d.info->>'created_at')::timestamptz, d.at,
           (select max(s.version) from consent.user_snapshots s
             where s.source = 'didomi' and s.tenant_id = d.tenant_id and s.user_id = d.user_id),
           d.delivery_id
      from unnest(v_apply) d
    on conflict (source, tenant_id, user_id) do update
       set external_ref      = case when excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.external_ref else coalesce(u.external_ref, excluded.external_ref) end,
           external_ref_type = case when excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.external_ref_type else coalesce(u.external_ref_type, excluded.external_ref_type) end,
           country           = case when excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.country else coalesce(u.country, excluded.country) end,
           last_seen_country = case when excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.last_seen_country else coalesce(u.last_seen_country, excluded.last_seen_country) end,
           metadata          = case when excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.metadata else coalesce(u.metadata, excluded.metadata) end,
           created_at        = coalesce(u.created_at, excluded.created_at),
           updated_at        = greatest(u.updated_at, excluded.updated_at),
           version           = excluded.version,
           deleted_at        = null,
           deleted_version   = null,
           last_delivery_id  = excluded.last_delivery_id;

    perform consent._apply_snapshot_consents(v_apply);
    perform consent._apply_snapshot_preferences(v_apply);

    return query select d.pos, 'applied'::text, null::text from unnest(v_apply) d;
end
$$;

revoke all on function consent._apply_snapshot_consents(consent.batch_user[]) from public;
revoke all on function consent._apply_snapshot_preferences(consent.batch_user[]) from public;
