-- 019_snapshot_lines.sql — a user listed more than once in one snapshot is compared once, as its newest.
--
-- An API scan read in pages while users change, or a concatenated file, may carry the same user (and
-- regulation) twice. Every line was staged and compared: the drift counted each item twice, an older
-- line was reported against newer stored state, and its repair was recorded without changing anything.
-- Staged rows now carry the snapshot line they came from, and before the comparison only the newest
-- line of each user and regulation is kept (highest version, then newest time, then the later line).

alter table consent.staging_users add column line bigint;
alter table consent.staging_consents add column line bigint;
alter table consent.staging_preferences add column line bigint;
alter table consent.staging_incomplete add column line bigint;
comment on column consent.staging_users.line is 'Position of the user in the snapshot (1 = first).';
comment on column consent.staging_consents.line is 'Position of its user in the snapshot.';
comment on column consent.staging_preferences.line is 'Position of its user in the snapshot.';
comment on column consent.staging_incomplete.line is 'Position of its user in the snapshot.';

create function consent.reconcile_keep_newest_lines()
returns bigint language plpgsql as $$
declare
    v_superseded bigint[];
begin
    select array_agg(r.line) into v_superseded
      from (select s.line,
                   row_number() over (partition by s.source, s.tenant_id, s.user_id, s.regulation
                                      order by s.version desc nulls last, s.updated_at desc nulls last, s.line desc) as n
              from consent.staging_users s) r
     where r.n > 1;
    if v_superseded is null then
        return 0;
    end if;
    delete from consent.staging_consents where line = any (v_superseded);
    delete from consent.staging_preferences where line = any (v_superseded);
    delete from consent.staging_incomplete where line = any (v_superseded);
    delete from consent.staging_users where line = any (v_superseded);
    return cardinality(v_superseded);
end
$$;
comment on function consent.reconcile_keep_newest_lines() is 'Reconciliation: keeps, of a user and regulation staged more than once, only its newest snapshot line; returns how many lines it dropped.';
revoke all on function consent.reconcile_keep_newest_lines() from public;
