-- The equivalent SQL of 50 webhooks in one transaction, multi-row with unnest arrays.
\set base random(1, 1000000)
\set version random(1, 1000000000)
BEGIN;
WITH u AS (SELECT (:base + g * 7919) % 1000000 AS user_id, :version + g AS version FROM generate_series(1, 50) g)
INSERT INTO ceiling.keys (key) SELECT 'user.updated:' || user_id || ':' || version FROM u ON CONFLICT DO NOTHING;
WITH u AS (SELECT (:base + g * 7919) % 1000000 AS user_id, :version + g AS version FROM generate_series(1, 50) g)
INSERT INTO ceiling.users (user_id, version, updated_at) SELECT user_id, version, now() FROM u
  ON CONFLICT (user_id) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at
  WHERE ceiling.users.version < excluded.version;
WITH u AS (SELECT (:base + g * 7919) % 1000000 AS user_id, :version + g AS version FROM generate_series(1, 50) g)
INSERT INTO ceiling.consents (user_id, purpose, status, seen)
  SELECT user_id, p, (version + i) % 3 <> 0, version FROM u, unnest(array['a','b','c','d','e']) WITH ORDINALITY AS t(p, i)
  ON CONFLICT (user_id, purpose) DO UPDATE SET status = excluded.status, seen = excluded.seen
  WHERE ceiling.consents.seen < excluded.seen;
INSERT INTO ceiling.payloads (body) SELECT payload FROM ceiling.sample, generate_series(1, 50);
COMMIT;
