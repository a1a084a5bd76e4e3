-- The equivalent SQL of one webhook, one per transaction: the event id (ON CONFLICT DO NOTHING), the
-- user, five consent rows under a newer-wins guard, a 1.5 KB jsonb payload.
\set user random(1, 1000000)
\set version random(1, 1000000000)
BEGIN;
INSERT INTO ceiling.keys (key) VALUES ('user.updated:' || :user || ':' || :version) ON CONFLICT DO NOTHING;
INSERT INTO ceiling.users (user_id, version, updated_at) VALUES (:user, :version, now())
  ON CONFLICT (user_id) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at
  WHERE ceiling.users.version < excluded.version;
INSERT INTO ceiling.consents (user_id, purpose, status, seen)
  SELECT :user, p, (:version + i) % 3 <> 0, :version FROM unnest(array['a','b','c','d','e']) WITH ORDINALITY AS t(p, i)
  ON CONFLICT (user_id, purpose) DO UPDATE SET status = excluded.status, seen = excluded.seen
  WHERE ceiling.consents.seen < excluded.seen;
INSERT INTO ceiling.payloads (body) SELECT (SELECT payload FROM ceiling.sample);
COMMIT;
