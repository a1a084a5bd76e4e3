-- 011_reconcile_times_and_history_views.sql — reconciliation judges "newer than the snapshot" by
-- source-side time; analysts can read the history.

-- PRODUCT §6: stored rows changed after the snapshot's time are newer and are not drift. "Changed" is
-- the source-side time (changed_at, and seen_at: the newest delivery that stated the row), as in §5.
-- 007 also skipped every row the agent *wrote* after the snapshot time, so a snapshot taken at a given
-- time (--snapshot-time, a file's modification time) missed all drift on rows received later, even
-- rows whose change at the source is older than the snapshot. The write time is now a separate, optional
-- guard, p_written_before: the agent passes it only when the snapshot time is its own clock at the
-- start of the fetch (API sources, standard input), where it also keeps rows that arrived during the
-- fetch whatever the source's clock says.
-- Preference values are compared as sets: stored arrays are sorted in the database's collation and
-- staged ones by code point, which differ for mixed-case ids on a non-C collation.

drop function consent.reconcile_diff(bigint, timestamptz);
drop function consent.reconcile_repair(bigint, timestamptz, boolean);

create function consent.reconcile_diff(p_run bigint, p_snapshot timestamptz, p_written_before timestamptz)
returns void language sql
set enable_nestloop = off
as $$
    insert into consent.reconciliation_drift (run_id, kind, source, tenant_id, user_id, regulation, item_id, detail, stored, snapshot)
    -- users the snapshot has and we do not (or only as deleted)
    select p_run, 'user_missing_here', s.source, s.tenant_id, s.user_id, null, null, null,
           case when u.user_id is null then null else jsonb_build_object('deleted_at', u.deleted_at) end,
           jsonb_build_object('external_ref', min(s.external_ref), 'version', max(s.version))
      from consent.staging_users s
      left join consent.users u using (source, tenant_id, user_id)
     where u.user_id is null or (u.deleted_at is not null and u.deleted_at <= p_snapshot)
     group by s.source, s.tenant_id, s.user_id, u.user_id, u.deleted_at
    union all
    -- users we have that the source no longer has (only tenants the snapshot covers)
    select p_run, 'user_missing_at_source', u.source, u.tenant_id, u.user_id, null, null, null,
           jsonb_build_object('external_ref', u.external_ref, 'version', u.version), null
      from consent.users u
     where u.deleted_at is null
       and (u.source, u.tenant_id) in (select distinct source, tenant_id from consent.staging_users)
       and not exists (select 1 from consent.staging_users s
                        where s.source = u.source and s.tenant_id = u.tenant_id and s.user_id = u.user_id)
       and u.first_seen_at <= coalesce(p_written_before, 'infinity') and coalesce(u.updated_at, '-infinity') <= p_snapshot
    union all
    -- consents: missing, different
    select p_run, case when c.item_id is null then 'consent_missing' else 'consent_different' end,
           s.source, s.tenant_id, s.user_id, nullif(s.regulation, ''), s.item_id,
           s.item_kind || ':' || s.lawful_basis,
           case when c.item_id is null then null
                else jsonb_build_object('status', c.status, 'valid_until', c.valid_until) end,
           jsonb_build_object('status', s.status, 'valid_until', s.valid_until)
      from consent.staging_consents s
      left join consent.consents c
        on c.source = s.source and c.tenant_id = s.tenant_id and c.user_id = s.user_id and c.regulation = s.regulation
       and c.item_kind = s.item_kind and c.item_id = s.item_id and c.lawful_basis = s.lawful_basis
     where (c.item_id is null
            or c.status <> s.status or c.valid_until is distinct from s.valid_until)
       and (c.item_id is null or (c.written_at <= coalesce(p_written_before, 'infinity') and c.seen_at <= p_snapshot))
       and not exists (select 1 from consent.users u
                        where u.source = s.source and u.tenant_id = s.tenant_id and u.user_id = s.user_id
                          and u.deleted_at > p_snapshot)
    union all
    -- consents the snapshot no longer has (for the users and regulations it covers)
    select p_run, 'consent_extra', c.source, c.tenant_id, c.user_id, nullif(c.regulation, ''), c.item_id,
           c.item_kind || ':' || c.lawful_basis,
           jsonb_build_object('status', c.status, 'valid_until', c.valid_until), null
      from consent.consents c
      join consent.staging_users su
        on su.source = c.source and su.tenant_id = c.tenant_id and su.user_id = c.user_id and su.regulation = c.regulation
     where (c.item_kind = 'purpose' or su.has_vendors)
       and c.written_at <= coalesce(p_written_before, 'infinity') and c.seen_at <= p_snapshot
       and not exists (select 1 from consent.staging_consents s
                        where s.source = c.source and s.tenant_id = c.tenant_id and s.user_id = c.user_id
                          and s.regulation = c.regulation and s.item_kind = c.item_kind and s.item_id = c.item_id
                          and s.lawful_basis = c.lawful_basis)
    union all
    -- preferences: missing, different or extra, one kind
    select p_run, 'preference_different', coalesce(s.source, p.source), coalesce(s.tenant_id, p.tenant_id),
           coalesce(s.user_id, p.user_id), nullif(coalesce(s.regulation, p.regulation), ''),
           coalesce(s.purpose_id, p.purpose_id) || '/' || coalesce(s.preference_id, p.preference_id),
           case when p.preference_id is null then 'missing' when s.preference_id is null then 'extra' else 'different' end,
           case when p.preference_id is null then null else to_jsonb(p.value_ids) end,
           case when s.preference_id is null then null else to_jsonb(s.value_ids) end
      from consent.staging_preferences s
      full join (select p.* from consent.preferences p
                   join consent.staging_users su
                     on su.source = p.source and su.tenant_id = p.tenant_id and su.user_id = p.user_id
                    and su.regulation = p.regulation) p
        on p.source = s.source and p.tenant_id = s.tenant_id and p.user_id = s.user_id and p.regulation = s.regulation
       and p.purpose_id = s.purpose_id and p.preference_id = s.preference_id
     where (p.preference_id is null or s.preference_id is null
            or (p.value_ids <> s.value_ids
                and not (p.value_ids @> s.value_ids and p.value_ids <@ s.value_ids
                         and cardinality(p.value_ids) = cardinality(s.value_ids))))
       and (p.preference_id is null or (p.written_at <= coalesce(p_written_before, 'infinity') and p.seen_at <= p_snapshot))
$$;
comment on function consent.reconcile_diff(bigint, timestamptz, timestamptz) is 'Records the drift between the staged snapshot and the stored state for a run: rows whose source-side time is after p_snapshot, or written after p_written_before (when given), are newer and not drift.';

-- Repair: make stored state match the staged snapshot, recorded in the history as caused by the run.
-- p_remove_users: whether users missing at the source lose their state (decided by the caller's guard).
create function consent.reconcile_repair(p_run bigint, p_snapshot timestamptz, p_remove_users boolean,
                                         p_written_before timestamptz)
returns void language plpgsql
set enable_nestloop = off
as $$
declare
    v_cause text := 'reconciliation:' || p_run;
    v_tie   text := 'reconciliation:' || lpad(p_run::text, 20, '0');
begin
    -- Serialise with webhook writers of the same users (same lock keys, global order) when the repair
    -- is small. A large one cannot hold a lock per user (the lock table is bounded); it relies on row
    -- locks instead: every write below re-checks written_at/seen_at against the snapshot, so a row a
    -- webhook commits meanwhile is left alone.
    if (select count(distinct (source, tenant_id, user_id)) from consent.reconciliation_drift where run_id = p_run) <= 2000 then
        perform pg_advisory_xact_lock(k) from (
            select distinct consent.user_lock_key(source, tenant_id, user_id) as k
              from consent.reconciliation_drift where run_id = p_run order by 1) s;
    end if;

    -- Users: create the missing ones, refresh identifiers and the version guard.
    insert into consent.users as u (source, tenant_id, user_id, external_ref, updated_at, version)
    select s.source, s.tenant_id, s.user_id, min(s.external_ref), max(s.updated_at), max(s.version)
      from consent.staging_users s
      join consent.reconciliation_drift d
        on d.run_id = p_run and d.kind = 'user_missing_here'
       and (d.source, d.tenant_id, d.user_id) = (s.source, s.tenant_id, s.user_id)
     group by s.source, s.tenant_id, s.user_id
    on conflict (source, tenant_id, user_id) do update
       set external_ref = excluded.external_ref, updated_at = greatest(u.updated_at, excluded.updated_at),
           version = coalesce(excluded.version, u.version), deleted_at = null, deleted_version = null;
    insert into consent.user_snapshots as us (source, tenant_id, user_id, regulation, version, updated_at)
    select distinct on (s.source, s.tenant_id, s.user_id, s.regulation)
           s.source, s.tenant_id, s.user_id, s.regulation, s.version, s.updated_at
      from consent.staging_users s
     where s.version is not null and s.updated_at is not null and s.updated_at <= p_snapshot
       and (s.source, s.tenant_id, s.user_id) in (select source, tenant_id, user_id from consent.reconciliation_drift where run_id = p_run)
     order by s.source, s.tenant_id, s.user_id, s.regulation, s.version desc, s.updated_at desc
    on conflict (source, tenant_id, user_id, regulation) do update
       set version = excluded.version, updated_at = excluded.updated_at
     where (us.version, us.updated_at) < (excluded.version, excluded.updated_at);

    -- Consents missing or different.
    with fix as (
        select distinct on (s.source, s.tenant_id, s.user_id, s.regulation, s.item_kind, s.item_id, s.lawful_basis) s.*
          from consent.staging_consents s
          join consent.reconciliation_drift d
            on d.run_id = p_run and d.kind in ('consent_missing', 'consent_different')
           and d.source = s.source and d.tenant_id = s.tenant_id and d.user_id = s.user_id
           and coalesce(d.regulation, '') = s.regulation and d.item_id = s.item_id
           and d.detail = s.item_kind || ':' || s.lawful_basis
         order by s.source, s.tenant_id, s.user_id, s.regulation, s.item_kind, s.item_id, s.lawful_basis, s.changed_at desc
    ), previous as (
        select c.* from consent.consents c join fix f
          on (c.source, c.tenant_id, c.user_id, c.regulation, c.item_kind, c.item_id, c.lawful_basis)
           = (f.source, f.tenant_id, f.user_id, f.regulation, f.item_kind, f.item_id, f.lawful_basis)
    ), written as (
        insert into consent.consents as c
               (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, raw_status,
                option_type, valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause)
        select source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, raw_status,
               option_type, valid_from, valid_until, coalesce(changed_at, p_snapshot), p_snapshot, p_snapshot, v_tie, v_cause
          from fix
        on conflict (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis) do update
           set status = excluded.status, raw_status = excluded.raw_status, option_type = excluded.option_type,
               valid_from = excluded.valid_from, valid_until = excluded.valid_until, changed_at = excluded.changed_at,
               seen_at = excluded.seen_at, seen_at2 = excluded.seen_at2, seen_tie = excluded.seen_tie,
               cause = excluded.cause, delivery_id = null, written_at = now()
         where c.written_at <= coalesce(p_written_before, 'infinity') and c.seen_at <= p_snapshot
        returning c.*
    )
    insert into consent.consent_history
           (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, previous_status,
            valid_from, valid_until, changed_at, seen_at, seen_at2, seen_tie, cause)
    select w.source, w.tenant_id, w.user_id, w.regulation, w.item_kind, w.item_id, w.lawful_basis, w.status, p.status,
           w.valid_from, w.valid_until, w.changed_at, w.seen_at, w.seen_at2, w.seen_tie, w.cause
      from written w left join previous p using (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis);

    -- Consents the snapshot no longer has.
    with gone as (
        delete from consent.consents c
         using consent.reconciliation_drift d
         where d.run_id = p_run and d.kind = 'consent_extra'
           and d.source = c.source and d.tenant_id = c.tenant_id and d.user_id = c.user_id
           and coalesce(d.regulation, '') = c.regulation and d.item_id = c.item_id
           and d.detail = c.item_kind || ':' || c.lawful_basis
           and c.written_at <= coalesce(p_written_before, 'infinity') and c.seen_at <= p_snapshot
        returning c.*
    )
    insert into consent.consent_history
           (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, previous_status,
            changed_at, seen_at, seen_at2, seen_tie, cause)
    select source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, null, status,
           p_snapshot, p_snapshot, p_snapshot, v_tie, v_cause
      from gone;

    -- Preferences: remove what differs or is extra, then write the snapshot's values.
    with gone as (
        delete from consent.preferences p
         using consent.reconciliation_drift d
         where d.run_id = p_run and d.kind = 'preference_different' and d.detail in ('extra', 'different')
           and d.source = p.source and d.tenant_id = p.tenant_id and d.user_id = p.user_id
           and coalesce(d.regulation, '') = p.regulation
           and d.item_id = p.purpose_id || '/' || p.preference_id
           and p.written_at <= coalesce(p_written_before, 'infinity') and p.seen_at <= p_snapshot
        returning p.*
    ), fix as (
        select distinct on (s.source, s.tenant_id, s.user_id, s.regulation, s.purpose_id, s.preference_id) s.*
          from consent.staging_preferences s
          join consent.reconciliation_drift d
            on d.run_id = p_run and d.kind = 'preference_different' and d.detail in ('missing', 'different')
           and d.source = s.source and d.tenant_id = s.tenant_id and d.user_id = s.user_id
           and coalesce(d.regulation, '') = s.regulation
           and d.item_id = s.purpose_id || '/' || s.preference_id
         where d.detail = 'missing' or exists (select 1 from gone g
                where (g.source, g.tenant_id, g.user_id, g.regulation, g.purpose_id, g.preference_id)
                    = (s.source, s.tenant_id, s.user_id, s.regulation, s.purpose_id, s.preference_id))
    ), written as (
        insert into consent.preferences (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids,
                                         changed_at, seen_at, seen_at2, seen_tie, cause)
        select source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids,
               coalesce(changed_at, p_snapshot), p_snapshot, p_snapshot, v_tie, v_cause
          from fix
        on conflict do nothing
        returning *
    )
    insert into consent.preference_history
           (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids, previous_value_ids,
            changed_at, seen_at, seen_at2, seen_tie, cause)
    select coalesce(w.source, g.source), coalesce(w.tenant_id, g.tenant_id), coalesce(w.user_id, g.user_id),
           coalesce(w.regulation, g.regulation), coalesce(w.purpose_id, g.purpose_id),
           coalesce(w.preference_id, g.preference_id), w.value_ids, g.value_ids,
           coalesce(w.changed_at, p_snapshot), p_snapshot, p_snapshot, v_tie, v_cause
      from written w
      full join gone g using (source, tenant_id, user_id, regulation, purpose_id, preference_id);

    -- Users the source no longer has: their state goes (history kept), a tombstone stays.
    if p_remove_users then
        with doomed as (
            select d.source, d.tenant_id, d.user_id from consent.reconciliation_drift d
             where d.run_id = p_run and d.kind = 'user_missing_at_source'
        ), gone as (
            delete from consent.consents c using doomed
             where (c.source, c.tenant_id, c.user_id) = (doomed.source, doomed.tenant_id, doomed.user_id)
               and c.written_at <= coalesce(p_written_before, 'infinity') and c.seen_at <= p_snapshot
            returning c.*
        )
        insert into consent.consent_history
               (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, previous_status,
                changed_at, seen_at, seen_at2, seen_tie, cause)
        select source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, null, status,
               p_snapshot, p_snapshot, p_snapshot, v_tie, v_cause
          from gone;
        with doomed as (
            select d.source, d.tenant_id, d.user_id from consent.reconciliation_drift d
             where d.run_id = p_run and d.kind = 'user_missing_at_source'
        ), gone as (
            delete from consent.preferences p using doomed
             where (p.source, p.tenant_id, p.user_id) = (doomed.source, doomed.tenant_id, doomed.user_id)
               and p.written_at <= coalesce(p_written_before, 'infinity') and p.seen_at <= p_snapshot
            returning p.*
        )
        insert into consent.preference_history
               (source, tenant_id, user_id, regulation, purpose_id, preference_id, value_ids, previous_value_ids,
                changed_at, seen_at, seen_at2, seen_tie, cause)
        select source, tenant_id, user_id, regulation, purpose_id, preference_id, null, value_ids,
               p_snapshot, p_snapshot, p_snapshot, v_tie, v_cause
          from gone;
        delete from consent.user_snapshots us using consent.reconciliation_drift d
         where d.run_id = p_run and d.kind = 'user_missing_at_source'
           and (us.source, us.tenant_id, us.user_id) = (d.source, d.tenant_id, d.user_id);
        update consent.users u set deleted_at = p_snapshot, external_ref = null, external_ref_type = null,
               metadata = null, country = null, last_seen_country = null
          from consent.reconciliation_drift d
         where d.run_id = p_run and d.kind = 'user_missing_at_source'
           and (u.source, u.tenant_id, u.user_id) = (d.source, d.tenant_id, d.user_id)
           and u.deleted_at is null and coalesce(u.updated_at, '-infinity') <= p_snapshot;
    end if;

    update consent.reconciliation_drift set repaired = true
     where run_id = p_run and (p_remove_users or kind <> 'user_missing_at_source');
end
$$;
comment on function consent.reconcile_repair(bigint, timestamptz, boolean, timestamptz) is 'Repairs the drift of a run; rows changed after the snapshot (source-side time, or written after p_written_before when given) keep their newer state.';

-- PRODUCT §4: the history is something analysts query, and consent_analyst reads views only. One row per
-- change, newest last, with what caused it; purpose and vendor changes both (item_kind tells them apart).
create view consent.consent_changes as
select h.id as change_id,
       h.source,
       h.tenant_id,
       h.user_id,
       nullif(h.regulation, '') as regulation,
       h.item_kind,
       h.item_id as purpose_id,
       h.lawful_basis,
       h.status,
       h.previous_status,
       h.valid_from,
       h.valid_until,
       h.changed_at,
       h.cause,
       h.delivery_id,
       h.recorded_at
  from consent.consent_history h;

comment on view consent.consent_changes is 'History of consent state: one row per change of a user''s purpose (or Didomi vendor) state, with the event, snapshot, transaction or reconciliation run that caused it.';
comment on column consent.consent_changes.change_id is 'Sequence number of the change (increases in the order changes were recorded).';
comment on column consent.consent_changes.source is 'didomi or dataguard.';
comment on column consent.consent_changes.tenant_id is 'Didomi organization_id / DataGuard applicationId.';
comment on column consent.consent_changes.user_id is 'Didomi user id / DataGuard citizenId.';
comment on column consent.consent_changes.regulation is 'Didomi regulation; NULL for DataGuard.';
comment on column consent.consent_changes.item_kind is 'purpose, or vendor for Didomi consents.vendors.';
comment on column consent.consent_changes.purpose_id is 'Didomi purpose id / DataGuard optionId (the vendor id when item_kind is vendor).';
comment on column consent.consent_changes.lawful_basis is 'consent, legitimate_interest, contract, public_interest, vital_interest or legal_obligation.';
comment on column consent.consent_changes.status is 'Status after the change; NULL when the row was removed (user deleted, purpose no longer in a newer snapshot).';
comment on column consent.consent_changes.previous_status is 'Status before the change; NULL when there was no row.';
comment on column consent.consent_changes.valid_from is 'Start of validity after the change (DataGuard validFrom).';
comment on column consent.consent_changes.valid_until is 'End of validity after the change; NULL = no end.';
comment on column consent.consent_changes.changed_at is 'Source-side time of the change (what consents_as_of compares with).';
comment on column consent.consent_changes.cause is 'What caused the change: didomi:user:<user>@v<version>, didomi:user.deleted:<user>, didomi:event:<event id>, dataguard:transaction:<transactionId>, dataguard:submission:<submissionId>, or reconciliation:<run id>.';
comment on column consent.consent_changes.delivery_id is 'Webhook delivery that carried the change (consent.deliveries); NULL for reconciliation.';
comment on column consent.consent_changes.recorded_at is 'When the agent recorded the change.';

create view consent.preference_changes as
select h.id as change_id,
       h.source,
       h.tenant_id,
       h.user_id,
       nullif(h.regulation, '') as regulation,
       nullif(h.purpose_id, '') as purpose_id,
       h.preference_id,
       h.value_ids,
       h.previous_value_ids,
       h.changed_at,
       h.cause,
       h.delivery_id,
       h.recorded_at
  from consent.preference_history h;

comment on view consent.preference_changes is 'History of preferences: one row per change of a user''s preference values, with what caused it.';
comment on column consent.preference_changes.change_id is 'Sequence number of the change (increases in the order changes were recorded).';
comment on column consent.preference_changes.source is 'didomi or dataguard.';
comment on column consent.preference_changes.tenant_id is 'Didomi organization_id / DataGuard applicationId.';
comment on column consent.preference_changes.user_id is 'Didomi user id / DataGuard citizenId.';
comment on column consent.preference_changes.regulation is 'Didomi regulation; NULL for DataGuard.';
comment on column consent.preference_changes.purpose_id is 'Didomi purpose the preference hangs under; NULL for DataGuard.';
comment on column consent.preference_changes.preference_id is 'Preference id.';
comment on column consent.preference_changes.value_ids is 'Selected value ids after the change (sorted); NULL when the preference was removed.';
comment on column consent.preference_changes.previous_value_ids is 'Value ids before the change; NULL when there was none.';
comment on column consent.preference_changes.changed_at is 'Source-side time of the change.';
comment on column consent.preference_changes.cause is 'What caused the change (as in consent_changes.cause).';
comment on column consent.preference_changes.delivery_id is 'Webhook delivery that carried the change; NULL for reconciliation.';
comment on column consent.preference_changes.recorded_at is 'When the agent recorded the change.';

revoke all on all tables in schema consent from public;
revoke all on all functions in schema consent from public;
grant select on consent.consent_changes, consent.preference_changes to consent_analyst;
grant execute on function consent.consents_as_of(timestamptz) to consent_analyst;
