-- 008_batch_apply.sql — set-based apply of Didomi user snapshots inside a batch.
--
-- Under load most deliveries are user.created / user.updated snapshots of distinct users. Applying
-- them one by one costs a dozen statements per delivery; here every such delivery of a batch whose
-- user appears only once in the batch is applied together, in one statement per step (idempotency,
-- guards, snapshot, user, consents, removals, preferences, history). Every other delivery (events,
-- deletions, DataGuard, rejects, and any user that appears more than once in the batch) still goes
-- through consent._apply_one in arrival order. The two groups touch disjoint users, so applying the
-- set-based group first changes nothing in what either sees.
--
-- The snapshot rule itself lives once, in consent._apply_didomi_snapshots: 002's
-- consent._apply_didomi_user is redefined here to hand its one snapshot to it.

create type consent.batch_user as (
    pos         integer,
    delivery_id bigint,
    tenant_id   text,
    user_id     text,
    regulation  text,
    dedup_key   text,
    version     bigint,
    at          timestamptz,
    tie         text,
    cause       text,
    info        jsonb,
    items       jsonb,
    prefs       jsonb,
    replaces    text[]
);
comment on type consent.batch_user is 'A Didomi user snapshot of a batch, as applied set-based by consent._apply_didomi_users.';

-- One change set (see ConsentCore.ChangeSet) as a batch_user row.
create function consent._batch_user(p_change jsonb, p_pos integer, p_delivery bigint)
returns consent.batch_user language sql stable as $$
    select row(p_pos, p_delivery, p_change->>'tenant', p_change->>'user', p_change->>'regulation',
               p_change->>'key', (p_change->'user_info'->>'version')::bigint, (p_change->>'at')::timestamptz,
               p_change->>'tie', p_change->>'cause', p_change->'user_info', p_change->'items', p_change->'prefs',
               case when jsonb_typeof(p_change->'replaces') = 'array'
                    then array(select jsonb_array_elements_text(p_change->'replaces')) end
              )::consent.batch_user
$$;

-- Idempotency for Didomi user snapshots of distinct users, then the snapshot rule; returns one
-- outcome per delivery (by batch position).
create function consent._apply_didomi_users(p_rows consent.batch_user[])
returns table (pos integer, outcome text, reason text)
language plpgsql
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_new   consent.batch_user[] := '{}';
    r       record;
begin
    -- A key already processed makes the delivery a duplicate.
    for r in
        select d, k.delivery_id as first
          from unnest(p_rows) d
          left join lateral (select k.delivery_id from consent.delivery_keys k
                              where k.source = 'didomi' and k.tenant_id = d.tenant_id and k.user_id = d.user_id
                                and k.dedup_key = d.dedup_key
                             offset 0) k on true
    loop
        if r.first is null then
            v_new := v_new || r.d;
        else
            pos := (r.d).pos; outcome := 'duplicate'; reason := format('already processed as delivery %s', r.first);
            return next;
        end if;
    end loop;
    if cardinality(v_new) = 0 then return; end if;

    insert into consent.delivery_keys (source, tenant_id, user_id, dedup_key, delivery_id)
    select 'didomi', d.tenant_id, d.user_id, d.dedup_key, d.delivery_id from unnest(v_new) d;

    return query select * from consent._apply_didomi_snapshots(v_new);
end
$$;

-- Didomi user.created / user.updated, for snapshots of distinct users whose keys are recorded: the
-- user's full merged state for one regulation (stale against a tombstone not older than it, or a
-- stored snapshot at least as new). Returns one outcome per delivery (by batch position).
--
-- Every lookup into a stored table is a LATERAL subquery per delivery (OFFSET 0 keeps it one), so the
-- plan is an index lookup per user whatever the statistics say: right after a bulk load the planner's
-- estimates lag far behind the table sizes, and a hash join over a whole table would cost seconds.
-- Plans are generic (planned once per session): with the lookups fixed as above, re-planning every
-- statement for each batch's own array would cost more than applying a small batch.
create function consent._apply_didomi_snapshots(p_rows consent.batch_user[])
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

    -- Consent rows under the ordering guard; a restated unchanged row keeps its changed_at and cause.
    -- incoming carries each item's stored row as it was before this statement (p_*).
    with incoming as (
        select i.*, p.status as p_status, p.valid_from as p_valid_from, p.valid_until as p_valid_until,
               p.found as p_found
          from (select distinct on (d.pos, x.kind, x.id, x.basis)
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
                 order by d.pos, x.kind, x.id, x.basis, 14 desc, 15 desc, 16 desc) i
          left join lateral (select c.status, c.valid_from, c.valid_until, true as found
                               from consent.consents c
                              where c.source = 'didomi' and c.tenant_id = i.tenant_id and c.user_id = i.user_id
                                and c.regulation = i.regulation and c.item_kind = i.kind and c.item_id = i.id
                                and c.lawful_basis = i.basis
                             offset 0) p on true
    ),
    written as (
        insert into consent.consents as c
               (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, raw_status,
                option_type, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause,
                provenance, delivery_id)
        select 'didomi', i.tenant_id, i.user_id, i.regulation, i.kind, i.id, i.basis, i.status, i.raw,
               i.option_type, i.valid_from, i.valid_until, i.at, i.at, i.at2, i.tie, i.cause,
               i.provenance, i.delivery_id
          from incoming i
        on conflict (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis) do update
           set status      = excluded.status,
               raw_status  = excluded.raw_status,
               option_type = excluded.option_type,
               valid_from  = excluded.valid_from,
               valid_until = excluded.valid_until,
               changed_at  = case when c.status = excluded.status
                                   and c.valid_from is not distinct from excluded.valid_from
                                   and c.valid_until is not distinct from excluded.valid_until
                                  then c.changed_at else excluded.changed_at end,
               cause       = case when c.status = excluded.status
                                   and c.valid_from is not distinct from excluded.valid_from
                                   and c.valid_until is not distinct from excluded.valid_until
                                  then c.cause else excluded.cause end,
               seen_at     = excluded.seen_at,
               seen_at2    = excluded.seen_at2,
               seen_tie    = excluded.seen_tie,
               provenance  = coalesce(excluded.provenance, c.provenance),
               delivery_id = excluded.delivery_id,
               written_at  = now()
         where (excluded.seen_at, excluded.seen_at2, excluded.seen_tie) > (c.seen_at, c.seen_at2, c.seen_tie)
        returning c.tenant_id, c.user_id, c.regulation, c.item_kind, c.item_id, c.lawful_basis, c.status,
                  c.valid_from, c.valid_until, c.changed_at, c.seen_at, c.seen_at2, c.seen_tie, c.cause,
                  c.delivery_id
    )
    insert into consent.consent_history
           (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status,
            previous_status, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
    select 'didomi', w.tenant_id, w.user_id, w.regulation, w.item_kind, w.item_id, w.lawful_basis, w.status,
           i.p_status, w.valid_from, w.valid_until, w.changed_at, w.seen_at, w.seen_at2, w.seen_tie, w.cause,
           w.delivery_id
      from written w
      join incoming i
        on i.tenant_id = w.tenant_id and i.user_id = w.user_id and i.regulation = w.regulation
       and i.kind = w.item_kind and i.id = w.item_id and i.basis = w.lawful_basis
     where i.p_found is null
        or i.p_status is distinct from w.status
        or i.p_valid_from is distinct from w.valid_from
        or i.p_valid_until is distinct from w.valid_until;

    -- Rows of the replaced kinds that the snapshot no longer carries, if older than the snapshot:
    -- found per user (index lookups), then deleted by row address.
    with removed as (
        delete from consent.consents c
         where c.ctid = any (array(
                   select x.ctid
                     from unnest(v_apply) d
                     cross join lateral (
                         select c.ctid from consent.consents c
                          where c.source = 'didomi' and c.tenant_id = d.tenant_id and c.user_id = d.user_id
                            and c.regulation = d.regulation
                            and c.item_kind = any (coalesce(d.replaces, array['purpose', 'vendor']))
                            and not exists (select 1
                                              from jsonb_to_recordset(coalesce(d.items, '[]')) as p(kind text, id text, basis text)
                                             where p.kind = c.item_kind and p.id = c.item_id and p.basis = c.lawful_basis)
                            and (c.seen_at, c.seen_at2, c.seen_tie) < (d.at, d.at, d.tie collate "C")
                         offset 0) x))
        returning c.tenant_id, c.user_id, c.regulation, c.item_kind, c.item_id, c.lawful_basis, c.status
    )
    insert into consent.consent_history
           (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status,
            previous_status, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
    select 'didomi', r.tenant_id, r.user_id, r.regulation, r.item_kind, r.item_id, r.lawful_basis, null,
           r.status, null, null, d.at, d.at, d.at, d.tie, d.cause, d.delivery_id
      from removed r
      join unnest(v_apply) d on d.tenant_id = r.tenant_id and d.user_id = r.user_id and d.regulation = r.regulation;

    -- Preferences under the ordering guard.
    with incoming as (
        select i.*, p.value_ids as p_value_ids, p.found as p_found
          from (select distinct on (d.pos, coalesce(x.purpose, ''), x.pref)
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
                 order by d.pos, coalesce(x.purpose, ''), x.pref, 9 desc, 10 desc, 11 desc) i
          left join lateral (select p.value_ids, true as found
                               from consent.preferences p
                              where p.source = 'didomi' and p.tenant_id = i.tenant_id and p.user_id = i.user_id
                                and p.regulation = i.regulation and p.purpose_id = i.purpose
                                and p.preference_id = i.pref
                             offset 0) p on true
    ),
    written as (
        insert into consent.preferences as p
               (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids, changed_at,
                seen_at, seen_at2, seen_tie, cause, provenance, delivery_id)
        select 'didomi', i.tenant_id, i.user_id, i.regulation, i.purpose, i.pref, i.value_ids, i.at, i.at, i.at2,
               i.tie, i.cause, i.provenance, i.delivery_id
          from incoming i
        on conflict (source, tenant_id, user_id, regulation, purpose_id, preference_id) do update
           set value_ids   = excluded.value_ids,
               changed_at  = case when p.value_ids = excluded.value_ids then p.changed_at else excluded.changed_at end,
               cause       = case when p.value_ids = excluded.value_ids then p.cause else excluded.cause end,
               seen_at     = excluded.seen_at,
               seen_at2    = excluded.seen_at2,
               seen_tie    = excluded.seen_tie,
               provenance  = coalesce(excluded.provenance, p.provenance),
               delivery_id = excluded.delivery_id,
               written_at  = now()
         where (excluded.seen_at, excluded.seen_at2, excluded.seen_tie) > (p.seen_at, p.seen_at2, p.seen_tie)
        returning p.tenant_id, p.user_id, p.regulation, p.purpose_id, p.preference_id, p.value_ids,
                  p.changed_at, p.seen_at, p.seen_at2, p.seen_tie, p.cause, p.delivery_id
    )
    insert into consent.preference_history
           (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids,
            previous_value_ids, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
    select 'didomi', w.tenant_id, w.user_id, w.regulation, w.purpose_id, w.preference_id, w.value_ids,
           i.p_value_ids, w.changed_at, w.seen_at, w.seen_at2, w.seen_tie, w.cause, w.delivery_id
      from written w
      join incoming i
        on i.tenant_id = w.tenant_id and i.user_id = w.user_id and i.regulation = w.regulation
       and i.purpose = w.purpose_id and i.pref = w.preference_id
     where i.p_found is null
        or i.p_value_ids is distinct from w.value_ids;

    -- Preferences the snapshot no longer carries, if older than the snapshot.
    with removed as (
        delete from consent.preferences p
         where p.ctid = any (array(
                   select x.ctid
                     from unnest(v_apply) d
                     cross join lateral (
                         select p.ctid from consent.preferences p
                          where p.source = 'didomi' and p.tenant_id = d.tenant_id and p.user_id = d.user_id
                            and p.regulation = d.regulation
                            and not exists (select 1
                                              from jsonb_to_recordset(coalesce(d.prefs, '[]')) as x(purpose text, pref text)
                                             where coalesce(x.purpose, '') = p.purpose_id and x.pref = p.preference_id)
                            and (p.seen_at, p.seen_at2, p.seen_tie) < (d.at, d.at, d.tie collate "C")
                         offset 0) x))
        returning p.tenant_id, p.user_id, p.regulation, p.purpose_id, p.preference_id, p.value_ids
    )
    insert into consent.preference_history
           (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids,
            previous_value_ids, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
    select 'didomi', r.tenant_id, r.user_id, r.regulation, r.purpose_id, r.preference_id, null,
           r.value_ids, d.at, d.at, d.at, d.tie, d.cause, d.delivery_id
      from removed r
      join unnest(v_apply) d on d.tenant_id = r.tenant_id and d.user_id = r.user_id and d.regulation = r.regulation;

    return query select d.pos, 'applied'::text, null::text from unnest(v_apply) d;
end
$$;

-- 002's one-by-one entry point (its caller has recorded the key): the same rule, for one snapshot.
create or replace function consent._apply_didomi_user(d jsonb, p_delivery bigint, out outcome text, out reason text)
language plpgsql as $$
begin
    select r.outcome, r.reason into outcome, reason
      from consent._apply_didomi_snapshots(array[consent._batch_user(d, 1, p_delivery)]) r;
end
$$;

-- The batch entry point (replaces 002's): delivery ids in arrival order, the set-based group, the
-- rest one by one in arrival order, then every delivery recorded in one insert.
create or replace function consent.apply_batch(p_batch jsonb, p_bodies bytea[])
returns table (delivery_id bigint, outcome text, reason text)
language plpgsql
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_n       integer := jsonb_array_length(p_batch);
    v_ids     bigint[];
    v_outcome text[];
    v_reason  text[];
    v_fast    consent.batch_user[];
    v_rest    integer[];
    v_pos     integer;
    r         record;
begin
    perform pg_advisory_xact_lock(s.k)
       from (select distinct consent.user_lock_key(e->>'source', e->>'tenant', e->>'user') as k
               from jsonb_array_elements(p_batch) e
              where e->>'tenant' is not null and e->>'user' is not null
              order by 1) s;

    v_ids := array(select nextval('consent.delivery_id_seq') from generate_series(1, v_n));
    v_outcome := array_fill(null::text, array[v_n]);
    v_reason := array_fill(null::text, array[v_n]);

    select array_agg(consent._batch_user(b.e, b.g, v_ids[b.g]) order by b.g) filter (where b.fast),
           array_agg(b.g order by b.g) filter (where not b.fast)
      into v_fast, v_rest
      from (select t.e, t.g::integer as g,
                   (t.e->>'action' = 'didomi_user' and t.e->>'source' = 'didomi'
                    and t.e->>'tenant' is not null and t.e->>'user' is not null and t.e->>'key' is not null
                    and count(*) over (partition by t.e->>'source', t.e->>'tenant', t.e->>'user') = 1) as fast
              from jsonb_array_elements(p_batch) with ordinality as t(e, g)) b;

    if v_fast is not null then
        for r in select * from consent._apply_didomi_users(v_fast) loop
            v_outcome[r.pos] := r.outcome;
            v_reason[r.pos] := r.reason;
        end loop;
    end if;
    if v_rest is not null then
        foreach v_pos in array v_rest loop
            select o.outcome, o.reason into r from consent._apply_one(p_batch->(v_pos - 1), v_ids[v_pos]) o;
            v_outcome[v_pos] := r.outcome;
            v_reason[v_pos] := r.reason;
        end loop;
    end if;

    insert into consent.deliveries
           (id, received_at, endpoint, source, tenant_id, user_id, event_type, dedup_key, outcome, reason,
            request_id, remote_addr, auth_principal, headers, body)
    select v_ids[t.g], coalesce((t.e->>'received_at')::timestamptz, now()), t.e->>'endpoint', t.e->>'source',
           t.e->>'tenant', t.e->>'user', t.e->>'type', t.e->>'key', v_outcome[t.g], v_reason[t.g],
           t.e->>'request_id', t.e->>'remote_addr', t.e->>'principal', coalesce(t.e->'headers', '{}'),
           p_bodies[t.g]
      from jsonb_array_elements(p_batch) with ordinality as t(e, g);

    return query select v_ids[g], v_outcome[g], v_reason[g] from generate_series(1, v_n) as g;
end
$$;
comment on function consent.apply_batch(jsonb, bytea[]) is 'Applies a batch of normalized deliveries in one transaction; returns one outcome per delivery, in order.';

-- Only the agent's own role runs the apply path.
revoke all on function consent._batch_user(jsonb, integer, bigint) from public;
revoke all on function consent._apply_didomi_users(consent.batch_user[]) from public;
revoke all on function consent._apply_didomi_snapshots(consent.batch_user[]) from public;
revoke all on function consent._apply_didomi_user(jsonb, bigint) from public;
revoke all on function consent.apply_batch(jsonb, bytea[]) from public;
