-- 013_history_retention_index.sql — history retention (retention.history_days) without a full scan.
--
-- consent.prune removes history by recorded_at, which had no index: each hourly pass scanned the whole
-- history, including the last pass of each round, which finds nothing. recorded_at is the time of the
-- insert, so the heap is in recorded_at order and a BRIN index (a min/max per block range) finds the
-- old rows by reading only their block ranges. Unlike a B-tree it costs the insert path nearly nothing:
-- a new row in a block range not yet summarized touches no index page.

create index consent_history_recorded_at on consent.consent_history using brin (recorded_at)
    with (autosummarize = on);
create index preference_history_recorded_at on consent.preference_history using brin (recorded_at)
    with (autosummarize = on);

comment on index consent.consent_history_recorded_at is 'Retention: finds history older than retention.history_days (consent.prune).';
comment on index consent.preference_history_recorded_at is 'Retention: finds history older than retention.history_days (consent.prune).';
