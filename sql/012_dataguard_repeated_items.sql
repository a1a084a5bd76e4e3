-- 012_dataguard_repeated_items.sql — a DataGuard delivery whose every item is already stored with the
-- same transaction / submission (a different body carrying the same items: a retry that was
-- re-serialised, or a receipt repeating a snapshot's transactions) is a duplicate (PRODUCT §4:
-- idempotency keys on the body and on each item's transactionId / submissionId), not 'applied'.
--
-- 004's rule stays where it is, renamed; this wrapper only names its no-op outcome.

alter function consent._apply_dataguard(jsonb, bigint, boolean) rename to _apply_dataguard_items;
comment on function consent._apply_dataguard_items(jsonb, bigint, boolean) is
    'DataGuard effective permissions (snapshot) or consent receipt: the ordering, removal and no-op rules (004).';

create function consent._apply_dataguard(d jsonb, p_delivery bigint, p_snapshot boolean, out outcome text, out reason text)
language plpgsql as $$
begin
    select r.outcome, r.reason into outcome, reason from consent._apply_dataguard_items(d, p_delivery, p_snapshot) r;
    -- 004 answers 'applied' with this reason when it wrote nothing because every item was equal.
    if outcome = 'applied' and reason like 'every item is already stored%' then
        outcome := 'duplicate';
    end if;
end
$$;
comment on function consent._apply_dataguard(jsonb, bigint, boolean, out text, out text) is
    'DataGuard apply: ''duplicate'' when every item is already stored with the same transaction / submission.';

revoke all on function consent._apply_dataguard(jsonb, bigint, boolean) from public;
