-- 001_core.sql — the consent mirror: raw deliveries, users, consent and preference state, history.
--
-- Every table is keyed first by (source, tenant_id, user_id): that triple is the distribution key if
-- the schema is ever spread over a Citus-style cluster, and the unit that writers serialise on
-- (a transaction-scoped advisory lock per user, taken in a global order, so concurrent batches on
-- several agent instances never deadlock and never interleave their changes to one user).
--
-- Ordering: every state row carries the source-side ordering key of the change that last touched it,
-- as the tuple (seen_at, seen_at2, seen_tie). A change applies to a row only when its own tuple is
-- strictly greater. Ties are broken by seen_tie, a source-side value (an event id, a transaction id, a
-- zero-padded user version), never by arrival order.
--
-- Regulation: Didomi state is per regulation ('gdpr', 'cpra', ...). Sources without regulations
-- (DataGuard) store '' here; the analysts' views show NULL.

create schema if not exists consent;
comment on schema consent is 'consent-sync: mirror of the consent-management platforms (Didomi, DataGuard CPM).';

-- ---------------------------------------------------------------------------------------------------
-- Raw deliveries: every webhook request that passed admission, with its exact bytes and outcome.
-- ---------------------------------------------------------------------------------------------------

create sequence consent.delivery_id_seq;

create table consent.deliveries (
    id              bigint primary key default nextval('consent.delivery_id_seq'),
    received_at     timestamptz not null default now(),
    endpoint        text not null,
    source          text not null,
    tenant_id       text,
    user_id         text,
    event_type      text,
    dedup_key       text,
    outcome         text not null check (outcome in ('applied', 'duplicate', 'stale', 'stored', 'failed')),
    reason          text,
    request_id      text,
    remote_addr     text,
    auth_principal  text,
    headers         jsonb not null default '{}',
    body            bytea not null,
    replayed_at     timestamptz,
    replayed_as     bigint
);
alter sequence consent.delivery_id_seq owned by consent.deliveries.id;
create index deliveries_received_at on consent.deliveries (received_at);
create index deliveries_kept on consent.deliveries (received_at)
    where outcome in ('failed', 'stored') and replayed_at is null;

comment on table consent.deliveries is 'Every webhook delivery that passed admission: raw bytes, redacted headers and outcome. Failed and stored deliveries are kept until replayed.';
comment on column consent.deliveries.id is 'Delivery id, returned to the sender as delivery_id.';
comment on column consent.deliveries.received_at is 'When the agent received the delivery.';
comment on column consent.deliveries.endpoint is 'Endpoint that received it: didomi, dataguard.effective-permissions, dataguard.consent-receipts, dataguard.citizen-emails.';
comment on column consent.deliveries.source is 'Platform: didomi or dataguard.';
comment on column consent.deliveries.tenant_id is 'Didomi organization_id / DataGuard applicationId, when it could be read.';
comment on column consent.deliveries.user_id is 'Didomi user id / DataGuard citizenId, when it could be read.';
comment on column consent.deliveries.event_type is 'Didomi event type (user.updated, ...) or DataGuard payload kind.';
comment on column consent.deliveries.dedup_key is 'Idempotency key derived from the payload (DOMAIN §5: event/user id and version; DataGuard body hash without sentAt).';
comment on column consent.deliveries.outcome is 'applied, duplicate, stale (older than stored state), stored (kept, not applied: unknown value), failed (could not be applied; see reason).';
comment on column consent.deliveries.reason is 'Why a delivery was stale, stored or failed.';
comment on column consent.deliveries.request_id is 'Request id, as logged.';
comment on column consent.deliveries.remote_addr is 'Caller address (after trusted-proxy resolution).';
comment on column consent.deliveries.auth_principal is 'Credential that admitted the delivery: oauth:<client_id>, jwt:<subject>, dataguard:api-key#<n>, dataguard:bearer#<n>, or auth-disabled.';
comment on column consent.deliveries.headers is 'Request headers, credentials redacted.';
comment on column consent.deliveries.body is 'Exact request body.';
comment on column consent.deliveries.replayed_at is 'When a kept delivery was replayed.';
comment on column consent.deliveries.replayed_as is 'Delivery id of the replay.';

create table consent.delivery_keys (
    source          text not null,
    tenant_id       text not null,
    user_id         text not null,
    dedup_key       text not null,
    delivery_id     bigint not null,
    applied_at      timestamptz not null default now(),
    primary key (source, tenant_id, user_id, dedup_key)
);
comment on table consent.delivery_keys is 'Idempotency: one row per delivery key processed (applied or stale). A second delivery with the same key is a duplicate.';
comment on column consent.delivery_keys.source is 'Platform.';
comment on column consent.delivery_keys.tenant_id is 'Tenant.';
comment on column consent.delivery_keys.user_id is 'User.';
comment on column consent.delivery_keys.dedup_key is 'Idempotency key.';
comment on column consent.delivery_keys.delivery_id is 'The delivery that first carried this key.';
comment on column consent.delivery_keys.applied_at is 'When it was processed.';

-- ---------------------------------------------------------------------------------------------------
-- Users.
-- ---------------------------------------------------------------------------------------------------

create table consent.users (
    source              text not null,
    tenant_id           text not null,
    user_id             text not null,
    external_ref        text,
    external_ref_type   text,
    country             text,
    last_seen_country   text,
    metadata            jsonb,
    created_at          timestamptz,
    updated_at          timestamptz,
    version             bigint,
    deleted_at          timestamptz,
    deleted_version     bigint,
    first_seen_at       timestamptz not null default now(),
    last_delivery_id    bigint,
    primary key (source, tenant_id, user_id)
);
comment on table consent.users is 'One row per platform user. A deleted user keeps a tombstone row (deleted_at set, identifiers cleared).';
comment on column consent.users.source is 'Platform.';
comment on column consent.users.tenant_id is 'Didomi organization_id / DataGuard applicationId.';
comment on column consent.users.user_id is 'Didomi user id / DataGuard citizenId.';
comment on column consent.users.external_ref is 'Didomi organization_user_id / DataGuard externalRef (personal data: cleared on deletion).';
comment on column consent.users.external_ref_type is 'Didomi organization_user_id_type.';
comment on column consent.users.country is 'Didomi country.';
comment on column consent.users.last_seen_country is 'Didomi last_seen_country.';
comment on column consent.users.metadata is 'Didomi user metadata (personal data: cleared on deletion).';
comment on column consent.users.created_at is 'Source-side creation time.';
comment on column consent.users.updated_at is 'Source-side time of the newest change applied to this user.';
comment on column consent.users.version is 'Didomi user version of the newest applied snapshot (any regulation); NULL for DataGuard.';
comment on column consent.users.deleted_at is 'Tombstone: when the user was deleted at the source. Only a strictly newer snapshot revives the user.';
comment on column consent.users.deleted_version is 'Didomi version carried by the deletion.';
comment on column consent.users.first_seen_at is 'When the agent first stored this user.';
comment on column consent.users.last_delivery_id is 'Delivery that last changed this row.';

create table consent.user_snapshots (
    source          text not null,
    tenant_id       text not null,
    user_id         text not null,
    regulation      text not null,
    version         bigint not null,
    updated_at      timestamptz not null,
    delivery_id     bigint,
    primary key (source, tenant_id, user_id, regulation)
);
comment on table consent.user_snapshots is 'Newest applied Didomi user snapshot per user and regulation: the version guard for user.created/user.updated.';
comment on column consent.user_snapshots.source is 'Platform.';
comment on column consent.user_snapshots.tenant_id is 'Tenant.';
comment on column consent.user_snapshots.user_id is 'User.';
comment on column consent.user_snapshots.regulation is 'Regulation of the snapshot.';
comment on column consent.user_snapshots.version is 'Didomi user version.';
comment on column consent.user_snapshots.updated_at is 'Didomi user updated_at.';
comment on column consent.user_snapshots.delivery_id is 'Delivery that carried it.';

-- ---------------------------------------------------------------------------------------------------
-- Current state.
-- ---------------------------------------------------------------------------------------------------

create table consent.consents (
    source          text not null,
    tenant_id       text not null,
    user_id         text not null,
    regulation      text not null,
    item_kind       text not null check (item_kind in ('purpose', 'vendor')),
    item_id         text not null,
    lawful_basis    text not null check (lawful_basis in ('consent', 'legitimate_interest', 'contract',
                                                          'public_interest', 'vital_interest', 'legal_obligation')),
    status          text not null check (status in ('granted', 'denied', 'pending', 'claimed', 'objected',
                                                    'objection_upheld', 'unset')),
    raw_status      text,
    option_type     text,
    valid_from      timestamptz,
    valid_until     timestamptz,
    changed_at      timestamptz not null,
    seen_at         timestamptz not null,
    seen_at2        timestamptz not null,
    seen_tie        text collate "C" not null,
    cause           text not null,
    provenance      jsonb,
    delivery_id     bigint,
    written_at      timestamptz not null default now(),
    primary key (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis)
);
comment on table consent.consents is 'Current consent state: one row per user, regulation, purpose (or vendor) and lawful basis.';
comment on column consent.consents.source is 'Platform.';
comment on column consent.consents.tenant_id is 'Tenant.';
comment on column consent.consents.user_id is 'User.';
comment on column consent.consents.regulation is 'Didomi regulation; empty for DataGuard.';
comment on column consent.consents.item_kind is 'purpose (Didomi purpose / DataGuard option or option group) or vendor (Didomi vendor).';
comment on column consent.consents.item_id is 'Purpose, option or vendor id.';
comment on column consent.consents.lawful_basis is 'Lawful basis.';
comment on column consent.consents.status is 'Normalized status.';
comment on column consent.consents.raw_status is 'Status as the platform sent it (true/false/null, GRANTED, ...).';
comment on column consent.consents.option_type is 'DataGuard optionType (option or group).';
comment on column consent.consents.valid_from is 'DataGuard validFrom.';
comment on column consent.consents.valid_until is 'DataGuard validUntil; NULL = no end.';
comment on column consent.consents.changed_at is 'Source-side time of the change that set this status.';
comment on column consent.consents.seen_at is 'Ordering key 1: source-side time of the newest change that touched the row.';
comment on column consent.consents.seen_at2 is 'Ordering key 2 (DataGuard recordedAt).';
comment on column consent.consents.seen_tie is 'Ordering key 3: source-side tie-break (event id, transaction id, padded user version).';
comment on column consent.consents.cause is 'What set the row: didomi:event:<id>, didomi:user:<id>@v<version>, dataguard:transaction:<id>, reconciliation:<run>.';
comment on column consent.consents.provenance is 'Platform provenance (channel, campaign, policy and statement ids, recorded by, delegate, ...).';
comment on column consent.consents.delivery_id is 'Delivery that last wrote the row.';
comment on column consent.consents.written_at is 'When the agent last wrote the row.';

create table consent.preferences (
    source          text not null,
    tenant_id       text not null,
    user_id         text not null,
    regulation      text not null,
    purpose_id      text not null,
    preference_id   text not null,
    value_ids       text[] not null,
    changed_at      timestamptz not null,
    seen_at         timestamptz not null,
    seen_at2        timestamptz not null,
    seen_tie        text collate "C" not null,
    cause           text not null,
    provenance      jsonb,
    delivery_id     bigint,
    written_at      timestamptz not null default now(),
    primary key (source, tenant_id, user_id, regulation, purpose_id, preference_id)
);
comment on table consent.preferences is 'Current preference choices: one row per user, regulation, purpose and preference.';
comment on column consent.preferences.source is 'Platform.';
comment on column consent.preferences.tenant_id is 'Tenant.';
comment on column consent.preferences.user_id is 'User.';
comment on column consent.preferences.regulation is 'Didomi regulation; empty for DataGuard.';
comment on column consent.preferences.purpose_id is 'Didomi purpose the preference hangs under; empty for DataGuard.';
comment on column consent.preferences.preference_id is 'Preference id / DataGuard preference reference.';
comment on column consent.preferences.value_ids is 'Selected value ids (choice references), sorted.';
comment on column consent.preferences.changed_at is 'Source-side time of the change that set these values.';
comment on column consent.preferences.seen_at is 'Ordering key 1.';
comment on column consent.preferences.seen_at2 is 'Ordering key 2.';
comment on column consent.preferences.seen_tie is 'Ordering key 3 (source-side tie-break).';
comment on column consent.preferences.cause is 'What set the row (event, user snapshot, submission, reconciliation).';
comment on column consent.preferences.provenance is 'Platform provenance (labels, submission id).';
comment on column consent.preferences.delivery_id is 'Delivery that last wrote the row.';
comment on column consent.preferences.written_at is 'When the agent last wrote the row.';

-- ---------------------------------------------------------------------------------------------------
-- History: append-only, one row per change of state (a NULL status / value_ids means the row was removed).
-- ---------------------------------------------------------------------------------------------------

create table consent.consent_history (
    id              bigint generated always as identity primary key,
    source          text not null,
    tenant_id       text not null,
    user_id         text not null,
    regulation      text not null,
    item_kind       text not null,
    item_id         text not null,
    lawful_basis    text not null,
    status          text,
    previous_status text,
    valid_from      timestamptz,
    valid_until     timestamptz,
    changed_at      timestamptz not null,
    seen_at         timestamptz not null,
    seen_at2        timestamptz not null,
    seen_tie        text collate "C" not null,
    cause           text not null,
    delivery_id     bigint,
    recorded_at     timestamptz not null default now()
);
create index consent_history_key on consent.consent_history
    (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, changed_at);
create index consent_history_changed_at on consent.consent_history (changed_at);
comment on table consent.consent_history is 'Audit trail: every change of consent state, with the event, snapshot or transaction that caused it. status NULL = the row was removed.';
comment on column consent.consent_history.id is 'Sequence number.';
comment on column consent.consent_history.source is 'Platform.';
comment on column consent.consent_history.tenant_id is 'Tenant.';
comment on column consent.consent_history.user_id is 'User.';
comment on column consent.consent_history.regulation is 'Didomi regulation; empty for DataGuard.';
comment on column consent.consent_history.item_kind is 'purpose or vendor.';
comment on column consent.consent_history.item_id is 'Purpose, option or vendor id.';
comment on column consent.consent_history.lawful_basis is 'Lawful basis.';
comment on column consent.consent_history.status is 'New status; NULL when the row was removed.';
comment on column consent.consent_history.previous_status is 'Status before the change; NULL when the row was new.';
comment on column consent.consent_history.valid_from is 'New validFrom.';
comment on column consent.consent_history.valid_until is 'New validUntil.';
comment on column consent.consent_history.changed_at is 'Source-side time of the change (what consents_as_of compares with).';
comment on column consent.consent_history.seen_at is 'Ordering key 1 of the change.';
comment on column consent.consent_history.seen_at2 is 'Ordering key 2 of the change.';
comment on column consent.consent_history.seen_tie is 'Ordering key 3 of the change.';
comment on column consent.consent_history.cause is 'Event, snapshot, transaction or reconciliation run that caused the change.';
comment on column consent.consent_history.delivery_id is 'Delivery that carried the change.';
comment on column consent.consent_history.recorded_at is 'When the agent recorded the change.';

create table consent.preference_history (
    id              bigint generated always as identity primary key,
    source          text not null,
    tenant_id       text not null,
    user_id         text not null,
    regulation      text not null,
    purpose_id      text not null,
    preference_id   text not null,
    value_ids       text[],
    previous_value_ids text[],
    changed_at      timestamptz not null,
    seen_at         timestamptz not null,
    seen_at2        timestamptz not null,
    seen_tie        text collate "C" not null,
    cause           text not null,
    delivery_id     bigint,
    recorded_at     timestamptz not null default now()
);
create index preference_history_key on consent.preference_history
    (source, tenant_id, user_id, regulation, purpose_id, preference_id, changed_at);
comment on table consent.preference_history is 'Audit trail of preference changes. value_ids NULL = the preference was removed.';
comment on column consent.preference_history.id is 'Sequence number.';
comment on column consent.preference_history.source is 'Platform.';
comment on column consent.preference_history.tenant_id is 'Tenant.';
comment on column consent.preference_history.user_id is 'User.';
comment on column consent.preference_history.regulation is 'Didomi regulation; empty for DataGuard.';
comment on column consent.preference_history.purpose_id is 'Didomi purpose; empty for DataGuard.';
comment on column consent.preference_history.preference_id is 'Preference id.';
comment on column consent.preference_history.value_ids is 'New value ids; NULL when removed.';
comment on column consent.preference_history.previous_value_ids is 'Value ids before the change.';
comment on column consent.preference_history.changed_at is 'Source-side time of the change.';
comment on column consent.preference_history.seen_at is 'Ordering key 1 of the change.';
comment on column consent.preference_history.seen_at2 is 'Ordering key 2 of the change.';
comment on column consent.preference_history.seen_tie is 'Ordering key 3 of the change.';
comment on column consent.preference_history.cause is 'What caused the change.';
comment on column consent.preference_history.delivery_id is 'Delivery that carried the change.';
comment on column consent.preference_history.recorded_at is 'When the agent recorded the change.';

-- ---------------------------------------------------------------------------------------------------
-- Didomi consent events (the log behind pending approvals and confirmations).
-- ---------------------------------------------------------------------------------------------------

create table consent.didomi_events (
    tenant_id       text not null,
    user_id         text not null,
    event_id        text not null,
    regulation      text not null,
    status          text,
    created_at      timestamptz not null,
    updated_at      timestamptz,
    deleted         boolean not null default false,
    consents        jsonb,
    proofs_id       text[],
    delegate        jsonb,
    last_delivery_id bigint,
    primary key (tenant_id, user_id, event_id)
);
comment on table consent.didomi_events is 'Didomi consent events as last seen (pending approvals, confirmations, deletions).';
comment on column consent.didomi_events.tenant_id is 'organization_id.';
comment on column consent.didomi_events.user_id is 'Didomi user id.';
comment on column consent.didomi_events.event_id is 'Event id.';
comment on column consent.didomi_events.regulation is 'Regulation of the event.';
comment on column consent.didomi_events.status is 'confirmed, pending_approval, ...';
comment on column consent.didomi_events.created_at is 'Event created_at.';
comment on column consent.didomi_events.updated_at is 'Event updated_at.';
comment on column consent.didomi_events.deleted is 'Whether the event was deleted (event.deleted).';
comment on column consent.didomi_events.consents is 'The partial choices the event carries.';
comment on column consent.didomi_events.proofs_id is 'Ids of attached proofs.';
comment on column consent.didomi_events.delegate is 'Third party acting for the user.';
comment on column consent.didomi_events.last_delivery_id is 'Delivery that last changed this row.';
