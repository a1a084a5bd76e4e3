-- 020_client_secret_hash.sql — client secrets are stored as salted SHA-256.
--
-- Secrets are 256 random bits, so a fast hash protects them as well as a slow one; PBKDF2 with
-- 210,000 rounds made every token request, even one naming an unknown client, cost a caller-chosen
-- amount of the agent's CPU. Hashes made by earlier versions stay valid and are kept as they are
-- (earlier instances sharing the database during a rolling upgrade still check them); re-creating a
-- client gives it the new form. Only the column's description changes here.

comment on column consent.oauth_clients.secret_hash is 'Salted hash of the client secret: sha256$<salt>$<hash> (pbkdf2-sha512$<rounds>$<salt>$<hash> for clients created by earlier versions, kept until the client is re-created). The secret itself is shown once, at creation.';
