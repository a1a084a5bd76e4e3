-- 014_reconcile_unknown_values.sql — a snapshot user carrying a value this version does not know.
--
-- A webhook carrying an unknown value (a new DataGuard permission state or justification) is kept as
-- `stored`, not applied (PRODUCT §2). A snapshot read by reconciliation can carry the same: the item
-- with the unknown value cannot be staged, and without it the stored row for that item looked like one
-- the source no longer has, so a repair removed it. Such users are now staged here; the run drops
-- their "consent_extra" drift before reporting or repairing, so their known items are still compared
-- and repaired and nothing of theirs is removed.

create unlogged table consent.staging_incomplete (
    source text not null, tenant_id text not null, user_id text not null, reason text);
create index staging_incomplete_key on consent.staging_incomplete (source, tenant_id, user_id);
revoke all on consent.staging_incomplete from public;

comment on table consent.staging_incomplete is 'Reconciliation staging: users whose snapshot carries a value this version does not know; none of their stored items is removed by the run.';
comment on column consent.staging_incomplete.source is 'Platform.';
comment on column consent.staging_incomplete.tenant_id is 'Tenant.';
comment on column consent.staging_incomplete.user_id is 'User.';
comment on column consent.staging_incomplete.reason is 'The unknown values, as named when a webhook carries them.';
