#!/usr/bin/env bash
# End-to-end walk: `consent-sync serve` on its embedded PostgreSQL (no configuration), every Didomi
# and DataGuard fixture posted with curl, then the analysts' views read with psql and compared with what the
# fixtures describe. Finally SIGTERM: the agent must exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
fixtures="$root/../shared/spec/fixtures"
port=${E2E_PORT:-18080}
pgport=${E2E_PG_PORT:-15432}

swift build --product consent-sync >/dev/null
bin="$(swift build --show-bin-path)/consent-sync"

state=$(mktemp -d /tmp/consent-sync-e2e.XXXXXX)
chmod 755 "$state"
log="$state/agent.log"
cleanup() {
  if [ -n "${agent:-}" ] && kill -0 "$agent" 2>/dev/null; then kill -TERM "$agent"; wait "$agent" || true; fi
  rm -rf "$state"
}
trap cleanup EXIT

env -u DATABASE_URL CONSENT_SYNC_STATE_DIRECTORY="$state" CONSENT_SYNC_EMBEDDED_PORT="$pgport" \
  CONSENT_SYNC_AUTH_DISABLED=true "$bin" serve --port "$port" >"$log" 2>&1 &
agent=$!

for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$agent" 2>/dev/null || { echo "agent exited during start-up:"; cat "$log"; exit 1; }
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || { echo "agent not ready:"; cat "$log"; exit 1; }

failures=0
post() {  # post FILE EXPECTED_STATUS [PATH]
  local reply status
  reply=$(curl -sS -X POST -H 'Content-Type: application/json' --data-binary "@$fixtures/didomi/webhooks/$1" \
    "http://127.0.0.1:$port${3:-/webhooks/didomi}")
  status=$(printf '%s' "$reply" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status"))')
  if [ "$status" = "$2" ]; then echo "ok   $1 -> $status"; else echo "FAIL $1 -> $reply (expected $2)"; failures=$((failures+1)); fi
}

post nested/user.created.json applied
post nested/event.created.json applied
post nested/user.updated.json applied
post nested/event.updated.json applied
post nested/event.deleted.json applied
post nested/user.deleted.json applied
post pending-sequence/01-event.created.pending.json applied
post pending-sequence/02-user.created.json applied
post pending-sequence/03-event.updated.confirmed.json applied
post pending-sequence/04-user.updated.json applied
post pending-existing-user/01-event.created.pending.json applied
post pending-existing-user/02-event.updated.confirmed.json applied
post pending-existing-user/03-user.updated.json applied
post flattened/event.created.flattened.json duplicate
post flattened/user.updated.flattened.json duplicate
post nested/user.updated.json duplicate
dg=../../dataguard/webhooks
post $dg/effective-permissions.json applied /webhooks/dataguard/effective-permissions
post $dg/consent-receipt.json applied /webhooks/dataguard/consent-receipts
# The snapshot above already carries this PENDING item with the same transactionId (both were sent at
# 09:58:31.004): the same change twice, so a duplicate (PRODUCT §4, per-item transaction keys).
post $dg/double-opt-in/01-consent-receipt.pending.json duplicate /webhooks/dataguard/consent-receipts
post $dg/double-opt-in/02-consent-receipt.granted.json applied /webhooks/dataguard/consent-receipts
post $dg/effective-permissions.json duplicate /webhooks/dataguard/effective-permissions
post $dg/citizen-email.SPECULATIVE.json stored /webhooks/dataguard/citizen-emails

q() { psql -X -A -F ' ' -t -h "$state/postgres/run" -p "$pgport" -U postgres -d consent_sync -c "$1"; }

check() {  # check NAME SQL EXPECTED
  local got
  got=$(q "$2")
  if [ "$got" = "$3" ]; then echo "ok   $1"; else
    echo "FAIL $1"; diff <(printf '%s\n' "$3") <(printf '%s\n' "$got") || true; failures=$((failures+1)); fi
}

check current_consents "select external_ref, regulation, purpose_id, lawful_basis, status, in_force
  from consent.current_consents where source = 'didomi' order by external_ref, purpose_id, lawful_basis" \
"alice@example.com gdpr analytics consent granted t
alice@example.com gdpr geolocation_data consent denied f
alice@example.com gdpr newsletter consent granted t
alice@example.com gdpr sms_offers consent granted t
bob@example.com gdpr analytics consent granted t
bob@example.com gdpr geolocation_data consent denied f
dave@example.com gdpr newsletter consent granted t"

check current_preferences "select external_ref, regulation, purpose_id, preference_id, array_to_string(value_ids, ',')
  from consent.current_preferences where source = 'didomi' order by external_ref, preference_id" \
"alice@example.com gdpr newsletter frequency-q3P1 weekly-11aa
alice@example.com gdpr newsletter topics-Xk29 tech-8a1f,travel-3c9d
dave@example.com gdpr newsletter topics-Xk29 food-77e2"

check current_users "select user_id, coalesce(external_ref, '-'), version, deleted_at is not null
  from consent.current_users where source = 'didomi' order by user_id" \
"2d9e4b71-0c5a-4f83-a6d2-71be39c0f5e2 bob@example.com 1 f
5be01c3f-77a2-4e9d-b0c4-e8f2136a9d05 dave@example.com 2 f
6f1c2a9e-3b7d-4c11-9e0a-5d2f8b7c1a40 alice@example.com 5 f
a4c7f0d2-8e19-4b5c-93fa-0d6e2b18c7a9 - 7 t"

check vendors "select user_id, vendor_id, status from consent.current_vendor_consents order by user_id, vendor_id" \
"2d9e4b71-0c5a-4f83-a6d2-71be39c0f5e2 c:acme-crm-Hq3bV2 denied
2d9e4b71-0c5a-4f83-a6d2-71be39c0f5e2 google granted
6f1c2a9e-3b7d-4c11-9e0a-5d2f8b7c1a40 c:acme-crm-Hq3bV2 granted
6f1c2a9e-3b7d-4c11-9e0a-5d2f8b7c1a40 google granted"

check sms_as_of_march_15 "select status from consent.consents_as_of('2025-03-15T00:00:00Z')
  where external_ref = 'alice@example.com' and purpose_id = 'sms_offers'" "denied"

check dataguard_consents "select tenant_id, user_id, external_ref, coalesce(regulation, 'NULL'), purpose_id, lawful_basis,
  status, in_force, coalesce(valid_until::date::text, '-') from consent.current_consents where source = 'dataguard'
  order by purpose_id" \
"app-Yq8Ld c0a80121-7d3e-4b6a-9f1e-2b3c4d5e6f70 CUST-000123 NULL f8Hba consent granted t 2027-03-10
app-Yq8Ld c0a80121-7d3e-4b6a-9f1e-2b3c4d5e6f70 CUST-000123 NULL grp-Post7 legitimate_interest claimed t -
app-Yq8Ld c0a80121-7d3e-4b6a-9f1e-2b3c4d5e6f70 CUST-000123 NULL k2Lmq consent granted t 2027-03-20
app-Yq8Ld c0a80121-7d3e-4b6a-9f1e-2b3c4d5e6f70 CUST-000123 NULL n3Ws8 consent granted t -
app-Yq8Ld c0a80121-7d3e-4b6a-9f1e-2b3c4d5e6f70 CUST-000123 NULL p9Wr3 legitimate_interest objected f -"

check dataguard_preferences "select coalesce(regulation, 'NULL'), coalesce(purpose_id, 'NULL'), preference_id,
  array_to_string(value_ids, ',') from consent.current_preferences where source = 'dataguard' order by preference_id" \
"NULL NULL email_frequency email_frequency_monthly
NULL NULL interests interests_cinema,interests_jazz"

check dataguard_users "select user_id, external_ref, coalesce(version::text, 'NULL') from consent.current_users
  where source = 'dataguard'" "c0a80121-7d3e-4b6a-9f1e-2b3c4d5e6f70 CUST-000123 NULL"

check citizen_emails "select email_type, status from consent.citizen_emails" "double-opt-in pending"

kill -TERM "$agent"
if wait "$agent"; then echo "ok   SIGTERM -> exit 0"; else echo "FAIL agent exited with $? after SIGTERM"; failures=$((failures+1)); fi
agent=

if [ "$failures" -gt 0 ]; then echo "e2e: $failures failure(s)"; cat "$log"; exit 1; fi
echo "e2e: all checks passed"
