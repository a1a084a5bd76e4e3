-- 021_failed_citizen_emails_kept.sql — a citizen e-mail refused as malformed is kept until replayed.
--
-- Retention spared failed and stored deliveries not yet replayed, except any citizen e-mail: those are
-- stored by design (the outbox in consent.citizen_emails holds them for the mailer, and keeps its own
-- rows). A citizen e-mail the agent refused (400, kept as failed) has no outbox row, and was pruned with
-- the applied deliveries: the only copy of the e-mail was lost, and `replay` never offered it. Now only
-- stored citizen e-mails are left out of what is kept for replay. The rule is written once, here:
-- retention, `replay`, `status` and the kept-deliveries gauge all ask consent.kept_for_replay. The rest
-- of 006's function is as it was.

create function consent.kept_for_replay(p_outcome text, p_replayed_at timestamptz, p_endpoint text)
returns boolean language sql immutable as $$
    select p_outcome in ('failed', 'stored') and p_replayed_at is null
           and not (p_endpoint = 'dataguard.citizen-emails' and p_outcome = 'stored')
$$;
comment on function consent.kept_for_replay(text, timestamptz, text) is 'Whether a delivery (outcome, replayed_at, endpoint of consent.deliveries) is kept for replay: failed ones, and stored ones except citizen e-mails (stored for the mailer by design), until replayed. Retention never removes them.';
revoke all on function consent.kept_for_replay(text, timestamptz, text) from public;

create or replace function consent.prune(p_deliveries interval, p_history interval default null, p_limit integer default 10000)
returns table (kind text, removed bigint)
language plpgsql as $$
declare
    n bigint;
begin
    with doomed as (
        select d.id from consent.deliveries d
         where d.received_at < now() - p_deliveries
           and not consent.kept_for_replay(d.outcome, d.replayed_at, d.endpoint)
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
comment on function consent.prune(interval, interval, integer) is 'Retention: removes raw deliveries (and their idempotency keys) older than p_deliveries, except failed ones not yet replayed (citizen e-mails included), stored ones not yet replayed (citizen e-mails excepted: they are stored for the mailer) and citizen e-mails still in the outbox; history only when p_history is given. At most p_limit rows per kind per call.';
revoke all on function consent.prune(interval, interval, integer) from public;
