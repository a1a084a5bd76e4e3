-- 005_oauth.sql — OAuth 2.0 client credentials for callers that ask our token URL for a token (Didomi).
-- Client secrets are stored as slow salted hashes; access tokens as SHA-256 digests. Both live in the
-- database so that every agent instance sharing it accepts the same tokens, and revoking a client
-- revokes its tokens everywhere.

create table consent.oauth_clients (
    client_id       text primary key,
    name            text not null,
    secret_hash     text not null,
    created_at      timestamptz not null default now(),
    revoked_at      timestamptz
);
comment on table consent.oauth_clients is 'OAuth clients allowed to obtain tokens at POST /oauth/token (managed with consent-sync clients).';
comment on column consent.oauth_clients.client_id is 'Client identifier.';
comment on column consent.oauth_clients.name is 'Human-readable name (e.g. didomi-production).';
comment on column consent.oauth_clients.secret_hash is 'Salted PBKDF2 hash of the client secret (the secret itself is shown once, at creation).';
comment on column consent.oauth_clients.created_at is 'When the client was created.';
comment on column consent.oauth_clients.revoked_at is 'When the client was revoked; its tokens stop working at once.';

create table consent.oauth_tokens (
    token_hash      bytea primary key,
    client_id       text not null references consent.oauth_clients (client_id) on delete cascade,
    issued_at       timestamptz not null default now(),
    expires_at      timestamptz not null
);
create index oauth_tokens_expires_at on consent.oauth_tokens (expires_at);
comment on table consent.oauth_tokens is 'Issued access tokens (SHA-256 of the token only).';
comment on column consent.oauth_tokens.token_hash is 'SHA-256 of the bearer token.';
comment on column consent.oauth_tokens.client_id is 'Client the token was issued to.';
comment on column consent.oauth_tokens.issued_at is 'When it was issued.';
comment on column consent.oauth_tokens.expires_at is 'When it stops being accepted.';

revoke all on consent.oauth_clients, consent.oauth_tokens from public;
