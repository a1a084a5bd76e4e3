-- 002_apply.sql — the apply path: one call per batch of deliveries, one transaction, set-based per delivery.
--
-- Helpers are PL/pgSQL (not SQL-language functions) so that their statements' plans are cached per
-- session instead of planned on every call.
--
-- The agent decodes each webhook into a normalized change set (JSON, see ConsentCore.ChangeSet) and
-- hands a whole batch to consent.apply_batch. The function
--   1. takes a transaction-scoped advisory lock per user of the batch, in one global order, so that
--      concurrent batches (on this or another agent instance) serialise per user without deadlocks;
--   2. walks the batch in arrival order: records the raw delivery, checks its idempotency key, and
--      applies it under the ordering guards;
--   3. returns one outcome per delivery, in batch order.
-- The caller commits once for the whole batch and only then answers each sender.

-- Lock key for one user (64-bit hash; a collision only serialises two users, never mixes them).
create function consent.user_lock_key(p_source text, p_tenant text, p_user text) returns bigint
language sql immutable parallel safe as $$
    select hashtextextended(p_source || E'\x1f' || p_tenant || E'\x1f' || p_user, 0)
$$;
comment on function consent.user_lock_key(text, text, text) is 'Advisory-lock key that serialises writers of one user.';

-- Upsert consent rows under the ordering guard and append what changed to the history.
-- Items: [{kind, id, basis, status, raw, option_type, valid_from, valid_until, at?, at2?, tie?, cause?, provenance?}];
-- an item without its own ordering key takes the call's (p_at, p_at2, p_tie).
-- p_restates: the items restate a full state (a user snapshot); an unchanged row keeps its changed_at and cause.
create function consent._upsert_consents(
    p_source text, p_tenant text, p_user text, p_regulation text, p_items jsonb,
    p_at timestamptz, p_at2 timestamptz, p_tie text, p_cause text, p_restates boolean, p_delivery bigint)
returns integer language plpgsql as $$
declare
    n integer;
begin
    with incoming as (
        select distinct on (x.kind, x.id, x.basis)
               x.kind, x.id, x.basis, x.status, x.raw, x.option_type, x.valid_from, x.valid_until,
               coalesce(x.at, p_at) as at,
               coalesce(x.at2, x.at, p_at2) as at2,
               coalesce(x.tie, p_tie) collate "C" as tie,
               coalesce(x.cause, p_cause) as cause,
               x.provenance
          from jsonb_to_recordset(coalesce(p_items, '[]')) as x(
               kind text, id text, basis text, status text, raw text, option_type text,
               valid_from timestamptz, valid_until timestamptz, at timestamptz, at2 timestamptz,
               tie text, cause text, provenance jsonb)
         order by x.kind, x.id, x.basis, 9 desc, 10 desc, 11 desc
    ),
    previous as (
        select c.item_kind, c.item_id, c.lawful_basis, c.status, c.valid_from, c.valid_until, c.cause
          from consent.consents c
          join incoming i on c.item_kind = i.kind and c.item_id = i.id and c.lawful_basis = i.basis
         where c.source = p_source and c.tenant_id = p_tenant and c.user_id = p_user
           and c.regulation = p_regulation
    ),
    written as (
        insert into consent.consents as c
               (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, raw_status,
                option_type, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause,
                provenance, delivery_id)
        select p_source, p_tenant, p_user, p_regulation, i.kind, i.id, i.basis, i.status, i.raw,
               i.option_type, i.valid_from, i.valid_until, i.at, i.at, i.at2, i.tie, i.cause,
               i.provenance, p_delivery
          from incoming i
        on conflict (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis) do update
           set status      = excluded.status,
               raw_status  = excluded.raw_status,
               option_type = excluded.option_type,
               valid_from  = excluded.valid_from,
               valid_until = excluded.valid_until,
               changed_at  = case when p_restates
                                   and c.status = excluded.status
                                   and c.valid_from is not distinct from excluded.valid_from
                                   and c.valid_until is not distinct from excluded.valid_until
                                  then c.changed_at else excluded.changed_at end,
               cause       = case when p_restates
                                   and c.status = excluded.status
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
        returning c.item_kind, c.item_id, c.lawful_basis, c.status, c.valid_from, c.valid_until,
                  c.changed_at, c.seen_at, c.seen_at2, c.seen_tie, c.cause
    ),
    logged as (
        insert into consent.consent_history
               (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status,
                previous_status, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause,
                delivery_id)
        select p_source, p_tenant, p_user, p_regulation, w.item_kind, w.item_id, w.lawful_basis, w.status,
               p.status, w.valid_from, w.valid_until, w.changed_at, w.seen_at, w.seen_at2, w.seen_tie,
               w.cause, p_delivery
          from written w
          left join previous p using (item_kind, item_id, lawful_basis)
         where p.item_id is null
            or p.status is distinct from w.status
            or p.valid_from is distinct from w.valid_from
            or p.valid_until is distinct from w.valid_until
            or (not p_restates and p.cause is distinct from w.cause)
        returning 1
    )
    select count(*)::integer into n from written;
    return n;
end
$$;

-- Remove consent rows of one user that a newer full state no longer carries.
-- p_regulation NULL = every regulation; p_kinds = the item kinds the state replaces (NULL = all);
-- p_present = the items the new state carries (kind, id, basis);
-- p_only_older: remove only rows whose ordering key is older than (p_at, p_at2, p_tie).
create function consent._remove_consents(
    p_source text, p_tenant text, p_user text, p_regulation text, p_kinds text[], p_present jsonb,
    p_at timestamptz, p_at2 timestamptz, p_tie text, p_cause text, p_only_older boolean, p_delivery bigint)
returns integer language plpgsql as $$
declare
    n integer;
begin
    with present as (
        select x.kind, x.id, x.basis
          from jsonb_to_recordset(coalesce(p_present, '[]')) as x(kind text, id text, basis text)
    ),
    removed as (
        delete from consent.consents c
         where c.source = p_source and c.tenant_id = p_tenant and c.user_id = p_user
           and (p_regulation is null or c.regulation = p_regulation)
           and (p_kinds is null or c.item_kind = any (p_kinds))
           and not exists (select 1 from present p
                            where p.kind = c.item_kind and p.id = c.item_id and p.basis = c.lawful_basis)
           and (not p_only_older
                or (c.seen_at, c.seen_at2, c.seen_tie) < (p_at, p_at2, p_tie collate "C"))
        returning c.*
    ),
    logged as (
        insert into consent.consent_history
               (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status,
                previous_status, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause,
                delivery_id)
        select r.source, r.tenant_id, r.user_id, r.regulation, r.item_kind, r.item_id, r.lawful_basis, null,
               r.status, null, null, p_at, p_at, p_at2, p_tie, p_cause, p_delivery
          from removed r
        returning 1
    )
    select count(*)::integer into n from removed;
    return n;
end
$$;

-- Upsert preference rows under the ordering guard, with history.
-- Prefs: [{purpose, pref, values: [sorted value ids], at?, at2?, tie?, cause?, provenance?}].
create function consent._upsert_preferences(
    p_source text, p_tenant text, p_user text, p_regulation text, p_prefs jsonb,
    p_at timestamptz, p_at2 timestamptz, p_tie text, p_cause text, p_restates boolean, p_delivery bigint)
returns integer language plpgsql as $$
declare
    n integer;
begin
    with incoming as (
        select distinct on (x.purpose, x.pref)
               coalesce(x.purpose, '') as purpose, x.pref,
               array(select jsonb_array_elements_text(x."values") order by 1) as value_ids,
               coalesce(x.at, p_at) as at,
               coalesce(x.at2, x.at, p_at2) as at2,
               coalesce(x.tie, p_tie) collate "C" as tie,
               coalesce(x.cause, p_cause) as cause,
               x.provenance
          from jsonb_to_recordset(coalesce(p_prefs, '[]')) as x(
               purpose text, pref text, "values" jsonb, at timestamptz, at2 timestamptz, tie text,
               cause text, provenance jsonb)
         order by x.purpose, x.pref, 4 desc, 5 desc, 6 desc
    ),
    previous as (
        select p.purpose_id, p.preference_id, p.value_ids, p.cause
          from consent.preferences p
          join incoming i on p.purpose_id = i.purpose and p.preference_id = i.pref
         where p.source = p_source and p.tenant_id = p_tenant and p.user_id = p_user
           and p.regulation = p_regulation
    ),
    written as (
        insert into consent.preferences as p
               (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids, changed_at,
                seen_at, seen_at2, seen_tie, cause, provenance, delivery_id)
        select p_source, p_tenant, p_user, p_regulation, i.purpose, i.pref, i.value_ids, i.at, i.at, i.at2,
               i.tie, i.cause, i.provenance, p_delivery
          from incoming i
        on conflict (source, tenant_id, user_id, regulation, purpose_id, preference_id) do update
           set value_ids   = excluded.value_ids,
               changed_at  = case when p_restates and p.value_ids = excluded.value_ids
                                  then p.changed_at else excluded.changed_at end,
               cause       = case when p_restates and p.value_ids = excluded.value_ids
                                  then p.cause else excluded.cause end,
               seen_at     = excluded.seen_at,
               seen_at2    = excluded.seen_at2,
               seen_tie    = excluded.seen_tie,
               provenance  = coalesce(excluded.provenance, p.provenance),
               delivery_id = excluded.delivery_id,
               written_at  = now()
         where (excluded.seen_at, excluded.seen_at2, excluded.seen_tie) > (p.seen_at, p.seen_at2, p.seen_tie)
        returning p.purpose_id, p.preference_id, p.value_ids, p.changed_at, p.seen_at, p.seen_at2,
                  p.seen_tie, p.cause
    ),
    logged as (
        insert into consent.preference_history
               (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids,
                previous_value_ids, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
        select p_source, p_tenant, p_user, p_regulation, w.purpose_id, w.preference_id, w.value_ids,
               pr.value_ids, w.changed_at, w.seen_at, w.seen_at2, w.seen_tie, w.cause, p_delivery
          from written w
          left join previous pr using (purpose_id, preference_id)
         where pr.preference_id is null
            or pr.value_ids is distinct from w.value_ids
            or (not p_restates and pr.cause is distinct from w.cause)
        returning 1
    )
    select count(*)::integer into n from written;
    return n;
end
$$;

-- Remove preference rows that a newer full state no longer carries (see _remove_consents).
create function consent._remove_preferences(
    p_source text, p_tenant text, p_user text, p_regulation text, p_present jsonb,
    p_at timestamptz, p_at2 timestamptz, p_tie text, p_cause text, p_only_older boolean, p_delivery bigint)
returns integer language plpgsql as $$
declare
    n integer;
begin
    with present as (
        select coalesce(x.purpose, '') as purpose, x.pref
          from jsonb_to_recordset(coalesce(p_present, '[]')) as x(purpose text, pref text)
    ),
    removed as (
        delete from consent.preferences p
         where p.source = p_source and p.tenant_id = p_tenant and p.user_id = p_user
           and (p_regulation is null or p.regulation = p_regulation)
           and not exists (select 1 from present x where x.purpose = p.purpose_id and x.pref = p.preference_id)
           and (not p_only_older
                or (p.seen_at, p.seen_at2, p.seen_tie) < (p_at, p_at2, p_tie collate "C"))
        returning p.*
    ),
    logged as (
        insert into consent.preference_history
               (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids,
                previous_value_ids, changed_at, seen_at, seen_at2, seen_tie, cause, delivery_id)
        select r.source, r.tenant_id, r.user_id, r.regulation, r.purpose_id, r.preference_id, null,
               r.value_ids, p_at, p_at, p_at2, p_tie, p_cause, p_delivery
          from removed r
        returning 1
    )
    select count(*)::integer into n from removed;
    return n;
end
$$;

-- Create or refresh the user row. p_authoritative: the delivery carries the user's full record
-- (a Didomi user snapshot, a DataGuard effective-permissions payload); otherwise only missing
-- identifiers are filled in. p_revive clears a tombstone.
create function consent._upsert_user(
    p_source text, p_tenant text, p_user text, p_info jsonb, p_at timestamptz,
    p_authoritative boolean, p_revive boolean, p_delivery bigint)
returns void language plpgsql as $$
begin
    insert into consent.users as u
           (source, tenant_id, user_id, external_ref, external_ref_type, country, last_seen_country, metadata,
            created_at, updated_at, version, last_delivery_id)
    values (p_source, p_tenant, p_user, p_info->>'external_ref', p_info->>'external_ref_type',
            p_info->>'country', p_info->>'last_seen_country', p_info->'metadata',
            (p_info->>'created_at')::timestamptz, p_at,
            (select max(s.version) from consent.user_snapshots s
              where s.source = p_source and s.tenant_id = p_tenant and s.user_id = p_user),
            p_delivery)
    on conflict (source, tenant_id, user_id) do update
       set external_ref      = case when p_authoritative and excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.external_ref
                                    else coalesce(u.external_ref, excluded.external_ref) end,
           external_ref_type = case when p_authoritative and excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.external_ref_type
                                    else coalesce(u.external_ref_type, excluded.external_ref_type) end,
           country           = case when p_authoritative and excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.country else coalesce(u.country, excluded.country) end,
           last_seen_country = case when p_authoritative and excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.last_seen_country
                                    else coalesce(u.last_seen_country, excluded.last_seen_country) end,
           metadata          = case when p_authoritative and excluded.updated_at >= coalesce(u.updated_at, '-infinity')
                                    then excluded.metadata else coalesce(u.metadata, excluded.metadata) end,
           created_at        = coalesce(u.created_at, excluded.created_at),
           updated_at        = greatest(u.updated_at, excluded.updated_at),
           version           = excluded.version,
           deleted_at        = case when p_revive then null else u.deleted_at end,
           deleted_version   = case when p_revive then null else u.deleted_version end,
           last_delivery_id  = excluded.last_delivery_id;
end
$$;

-- Didomi user.created / user.updated: the user's full merged state for one regulation.
create function consent._apply_didomi_user(d jsonb, p_delivery bigint, out outcome text, out reason text)
language plpgsql as $$
#variable_conflict use_column
declare
    v_tenant  text := d->>'tenant';
    v_user    text := d->>'user';
    v_reg     text := d->>'regulation';
    v_version bigint := (d->'user_info'->>'version')::bigint;
    v_at      timestamptz := (d->>'at')::timestamptz;
    v_tie     text := d->>'tie';
    v_cause   text := d->>'cause';
    v_deleted timestamptz;
    s_version bigint;
    s_at      timestamptz;
begin
    select u.deleted_at into v_deleted
      from consent.users u where u.source = 'didomi' and u.tenant_id = v_tenant and u.user_id = v_user;
    if v_deleted is not null and v_at <= v_deleted then
        outcome := 'stale';
        reason := format('user was deleted at %s; this snapshot (updated_at %s) is not newer', v_deleted, v_at);
        return;
    end if;

    select s.version, s.updated_at into s_version, s_at
      from consent.user_snapshots s
     where s.source = 'didomi' and s.tenant_id = v_tenant and s.user_id = v_user and s.regulation = v_reg;
    if found and (v_version < s_version or (v_version = s_version and v_at <= s_at)) then
        outcome := 'stale';
        reason := format('stored %s state is version %s (updated_at %s); this snapshot is version %s (updated_at %s)',
                         v_reg, s_version, s_at, v_version, v_at);
        return;
    end if;

    insert into consent.user_snapshots as s (source, tenant_id, user_id, regulation, version, updated_at, delivery_id)
    values ('didomi', v_tenant, v_user, v_reg, v_version, v_at, p_delivery)
    on conflict (source, tenant_id, user_id, regulation) do update
       set version = excluded.version, updated_at = excluded.updated_at, delivery_id = excluded.delivery_id;

    perform consent._upsert_user('didomi', v_tenant, v_user, d->'user_info', v_at, true, true, p_delivery);
    perform consent._upsert_consents('didomi', v_tenant, v_user, v_reg, d->'items', v_at, v_at, v_tie, v_cause, true, p_delivery);
    perform consent._remove_consents('didomi', v_tenant, v_user, v_reg,
                                     array(select jsonb_array_elements_text(coalesce(d->'replaces', '["purpose","vendor"]'))),
                                     d->'items', v_at, v_at, v_tie, v_cause, true, p_delivery);
    perform consent._upsert_preferences('didomi', v_tenant, v_user, v_reg, d->'prefs', v_at, v_at, v_tie, v_cause, true, p_delivery);
    perform consent._remove_preferences('didomi', v_tenant, v_user, v_reg, d->'prefs', v_at, v_at, v_tie, v_cause, true, p_delivery);
    outcome := 'applied';
end
$$;

-- Didomi event.created / event.updated / event.deleted: partial choices, applied only once confirmed.
create function consent._apply_didomi_event(d jsonb, p_delivery bigint, out outcome text, out reason text)
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
    v_prior    text;
    v_at       timestamptz;
    v_deleted  timestamptz;
    v_changed  integer;
    v_choices  integer := jsonb_array_length(coalesce(d->'items', '[]')) + jsonb_array_length(coalesce(d->'prefs', '[]'));
begin
    select ev.status, ev.updated_at into s_status, s_updated
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

    select u.deleted_at into v_deleted
      from consent.users u where u.source = 'didomi' and u.tenant_id = v_tenant and u.user_id = v_user;
    if v_deleted is not null then
        outcome := 'stale';
        reason := format('user was deleted at %s; only a newer user snapshot revives it', v_deleted);
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

-- Didomi user.deleted: remove the user's state in every regulation and leave a tombstone.
create function consent._apply_didomi_user_deleted(d jsonb, p_delivery bigint, out outcome text, out reason text)
language plpgsql as $$
#variable_conflict use_column
declare
    v_tenant   text := d->>'tenant';
    v_user     text := d->>'user';
    v_at       timestamptz := (d->>'at')::timestamptz;
    v_cause    text := d->>'cause';
    v_tie      text := d->>'tie';
    v_deleted  timestamptz;
    v_newer    timestamptz;
begin
    select max(s.updated_at) into v_newer
      from consent.user_snapshots s
     where s.source = 'didomi' and s.tenant_id = v_tenant and s.user_id = v_user and s.updated_at > v_at;
    if v_newer is not null then
        outcome := 'stale';
        reason := format('a newer snapshot of the user (updated_at %s) is stored than this deletion (%s)', v_newer, v_at);
        return;
    end if;
    select u.deleted_at into v_deleted
      from consent.users u where u.source = 'didomi' and u.tenant_id = v_tenant and u.user_id = v_user;
    if v_deleted is not null and v_deleted >= v_at then
        outcome := 'stale';
        reason := format('user already deleted at %s', v_deleted);
        return;
    end if;

    perform consent._remove_consents('didomi', v_tenant, v_user, null, null, null, v_at, v_at, v_tie, v_cause, false, p_delivery);
    perform consent._remove_preferences('didomi', v_tenant, v_user, null, null, v_at, v_at, v_tie, v_cause, false, p_delivery);
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

-- One delivery: idempotency, then the rule for its kind (the DataGuard rules are in 004_dataguard.sql).
create function consent._apply_one(d jsonb, p_delivery bigint, out outcome text, out reason text)
language plpgsql as $$
#variable_conflict use_column
declare
    v_first bigint;
begin
    if d->>'action' = 'reject' then
        outcome := 'failed'; reason := d->>'reason'; return;
    elsif d->>'action' = 'store' then
        outcome := 'stored'; reason := d->>'reason'; return;
    end if;

    if d->>'key' is not null then
        insert into consent.delivery_keys (source, tenant_id, user_id, dedup_key, delivery_id)
        values (d->>'source', coalesce(d->>'tenant', ''), coalesce(d->>'user', ''), d->>'key', p_delivery)
        on conflict do nothing;
        if not found then
            select k.delivery_id into v_first
              from consent.delivery_keys k
             where k.source = d->>'source' and k.tenant_id = coalesce(d->>'tenant', '')
               and k.user_id = coalesce(d->>'user', '') and k.dedup_key = d->>'key';
            outcome := 'duplicate';
            reason := format('already processed as delivery %s', v_first);
            return;
        end if;
    end if;

    case d->>'action'
        when 'didomi_user' then
            select r.outcome, r.reason into outcome, reason from consent._apply_didomi_user(d, p_delivery) r;
        when 'didomi_event' then
            select r.outcome, r.reason into outcome, reason from consent._apply_didomi_event(d, p_delivery) r;
        when 'didomi_user_deleted' then
            select r.outcome, r.reason into outcome, reason from consent._apply_didomi_user_deleted(d, p_delivery) r;
        when 'dataguard_snapshot' then
            select r.outcome, r.reason into outcome, reason from consent._apply_dataguard(d, p_delivery, true) r;
        when 'dataguard_receipt' then
            select r.outcome, r.reason into outcome, reason from consent._apply_dataguard(d, p_delivery, false) r;
        when 'dataguard_email' then
            select r.outcome, r.reason into outcome, reason from consent._apply_dataguard_email(d, p_delivery) r;
        else
            raise exception 'unknown apply action %', d->>'action' using errcode = '22023';
    end case;
end
$$;


-- The batch entry point. p_batch: JSON array of change sets; p_bodies: the raw bodies, same order.
create function consent.apply_batch(p_batch jsonb, p_bodies bytea[])
returns table (delivery_id bigint, outcome text, reason text)
language plpgsql as $$
#variable_conflict use_column
declare
    d        jsonb;
    n        integer := 0;
    v_id     bigint;
    v_result record;
begin
    perform pg_advisory_xact_lock(s.k)
       from (select distinct consent.user_lock_key(e->>'source', e->>'tenant', e->>'user') as k
               from jsonb_array_elements(p_batch) e
              where e->>'tenant' is not null and e->>'user' is not null
              order by 1) s;

    for d in select value from jsonb_array_elements(p_batch) loop
        n := n + 1;
        v_id := nextval('consent.delivery_id_seq');
        select r.outcome, r.reason into v_result from consent._apply_one(d, v_id) r;
        insert into consent.deliveries
               (id, received_at, endpoint, source, tenant_id, user_id, event_type, dedup_key, outcome, reason,
                request_id, remote_addr, auth_principal, headers, body)
        values (v_id, coalesce((d->>'received_at')::timestamptz, now()), d->>'endpoint', d->>'source',
                d->>'tenant', d->>'user', d->>'type', d->>'key', v_result.outcome, v_result.reason,
                d->>'request_id', d->>'remote_addr', d->>'principal', coalesce(d->'headers', '{}'), p_bodies[n]);
        delivery_id := v_id;
        outcome := v_result.outcome;
        reason := v_result.reason;
        return next;
    end loop;
end
$$;
comment on function consent.apply_batch(jsonb, bytea[]) is 'Applies a batch of normalized deliveries in one transaction; returns one outcome per delivery, in order.';
