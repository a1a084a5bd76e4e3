-- 006_operations.sql — retention of raw deliveries, for operators.

-- Prunes what the retention settings no longer keep, in bounded chunks; returns what was removed.
-- Never removed: failed or stored deliveries that were not replayed, deliveries whose citizen email
-- is still waiting in the outbox. History is pruned only when p_history is given.
create function consent.prune(p_deliveries interval, p_history interval default null, p_limit integer default 10000)
returns table (kind text, removed bigint)
language plpgsql as $$
declare
    n bigint;
begin
    with doomed as (
        select d.id from consent.deliveries d
         where d.received_at < now() - p_deliveries
           and not (d.outcome in ('failed', 'stored') and d.replayed_at is null
                    and d.endpoint <> 'dataguard.citizen-emails')
           and not exists (select 1 from consent.citizen_emails e
                            where e.delivery_id = d.id and e.status in ('pending', 'sending', 'failed'))
         limit p_limit)
    delete from consent.deliveries d using doomed where d.id = doomed.id;
    get diagnostics n = row_count;
    kind := 'deliveries'; removed := n; return next;

    with doomed as (
        select k.source, k.tenant_id, k.user_id, k.dedup_key from consent.delivery_keys k
         where k.applied_at < now() - p_deliveries limit p_limit)
    delete from consent.delivery_keys k using doomed
     where (k.source, k.tenant_id, k.user_id, k.dedup_key) = (doomed.source, doomed.tenant_id, doomed.user_id, doomed.dedup_key);
    get diagnostics n = row_count;
    kind := 'delivery_keys'; removed := n; return next;

    delete from consent.oauth_tokens where expires_at < now() - interval '1 day';
    get diagnostics n = row_count;
    kind := 'oauth_tokens'; removed := n; return next;

    if p_history is not null then
        with doomed as (select id from consent.consent_history where recorded_at < now() - p_history limit p_limit)
        delete from consent.consent_history h using doomed where h.id = doomed.id;
        get diagnostics n = row_count;
        kind := 'consent_history'; removed := n; return next;
        with doomed as (select id from consent.preference_history where recorded_at < now() - p_history limit p_limit)
        delete from consent.preference_history h using doomed where h.id = doomed.id;
        get diagnostics n = row_count;
        kind := 'preference_history'; removed := n; return next;
    end if;
end
$$;
comment on function consent.prune(interval, interval, integer) is 'Retention: removes raw deliveries (and their idempotency keys) older than p_deliveries, except failed/stored ones not yet replayed and citizen emails still in the outbox; history only when p_history is given. At most p_limit rows per kind per call.';
revoke all on function consent.prune(interval, interval, integer) from public;
