#!/usr/bin/env bash
# Reconciliation benchmark: an N-user Didomi snapshot (default 1,000,000 users x 8 purposes) with a
# known share of drift, reconciled by the agent; then the same COPY + diff + repair in plain psql on a
# copy of the same database, as the ceiling.
#
#   bench/reconcile.sh                       # 1,000,000 users, 2 % drift, release build
#   USERS=1000 bench/reconcile.sh --smoke    # what CI runs (debug build)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=release
users=${USERS:-1000000}
drift=${DRIFT:-0.02}
if [ "${1:-}" = "--smoke" ]; then mode=debug; users=${USERS:-1000}; fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

echo "== building ($mode)"
# Release as shipped (README, "Running it in production"): the Swift runtime linked statically.
build=(-c "$mode"); [ "$mode" = release ] && build+=(--static-swift-stdlib)
swift build "${build[@]}" --product consent-sync >/dev/null
bin="$(swift build "${build[@]}" --show-bin-path)/consent-sync"

work=$(mktemp -d /tmp/consent-sync-reconcile-bench.XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres "$work"; as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --); fi
cleanup() {
  [ -n "${pg:-}" ] && kill -INT "$pg" 2>/dev/null && wait "$pg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== generating $users users x 8 purposes, drift share $drift"
python3 bench/gen_snapshot.py "$users" "$drift" "$work"
chmod 644 "$work"/*
cat "$work/expected.txt"

"${as_pg[@]}" "$pgbin/initdb" -D "$work/data" --auth=trust -U postgres >/dev/null
"${as_pg[@]}" "$pgbin/postgres" -D "$work/data" -c listen_addresses='' -c unix_socket_directories="$work" \
  -c shared_buffers=1GB -c max_wal_size=8GB -c maintenance_work_mem=512MB -c work_mem=64MB >"$work/pg.log" 2>&1 &
pg=$!
for _ in $(seq 1 100); do "$pgbin/pg_isready" -q -h "$work" && break; sleep 0.1; done
psql() { command psql -X -q -v ON_ERROR_STOP=1 -h "$work" -U postgres "$@"; }
psql -c "create database bench"
export DATABASE_URL="postgres://postgres@localhost:5432/bench?host=$work"
export CONSENT_SYNC_LOG_LEVEL=warning

timed() {  # timed LABEL CMD...: wall seconds and peak RSS of CMD
  local start end peak=0 pid rc
  start=$(date +%s.%N)
  "$@" > "$work/out.json" 2>"$work/err.log" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
    [ -n "$hwm" ] && [ "$hwm" -gt "$peak" ] && peak=$hwm
    sleep 0.2
  done
  set +e; wait "$pid"; rc=$?; set -e
  end=$(date +%s.%N)
  echo "$(python3 -c "print(round($end - $start, 2))") $((peak / 1024)) $rc"
}

echo "== initial load of the stored state (plain SQL: COPY + diff + repair of the base snapshot)"
load_start=$(date +%s.%N)
psql -d bench -c "select 1" >/dev/null
"$bin" migrate >/dev/null 2>&1
psql -d bench <<SQL
\copy consent.staging_users (source, tenant_id, user_id, regulation, external_ref, version, updated_at, has_vendors) from '$work/base_users.tsv'
\copy consent.staging_consents (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, raw_status, option_type, valid_from, valid_until, changed_at) from '$work/base_consents.tsv'
analyze consent.staging_users, consent.staging_consents;
insert into consent.reconciliation_runs (source, mode, snapshot_time) values ('file', 'repair', now());
select consent.reconcile_diff(currval('consent.reconciliation_runs_id_seq'), now(), null);
analyze consent.reconciliation_drift;
select consent.reconcile_repair(currval('consent.reconciliation_runs_id_seq'), now(), true, null);
truncate consent.staging_users, consent.staging_consents, consent.staging_preferences;
vacuum analyze;
SQL
load_s=$(python3 -c "print(round($(date +%s.%N) - $load_start, 2))"); load_mib=0
echo "initial load: ${load_s}s"
psql -c "create database rawsql template bench"

echo "== reconcile the drifted snapshot (agent)"
# The export is taken after the stored state was written: its time is now (a second later than the
# load, since the time below has whole seconds).
sleep 1
snapshot_time=$(date -u +%Y-%m-%dT%H:%M:%SZ)
read -r run_s run_mib run_rc < <(timed "$bin" reconcile --source file --file "$work/drifted.ndjson" --snapshot-time "$snapshot_time" --json)
found=$(python3 -c "import json; r=json.load(open('$work/out.json')); print(' '.join(f'{k}={v}' for k,v in sorted(r['drift'].items())), r['outcome'])")
echo "agent: ${run_s}s, peak RSS ${run_mib} MiB, exit $run_rc; found: $found"

echo "== the same in plain SQL (COPY pre-normalized rows + reconcile_diff + reconcile_repair)"
raw_start=$(date +%s.%N)
psql -d rawsql <<SQL
truncate consent.staging_users, consent.staging_consents, consent.staging_preferences;
\copy consent.staging_users (source, tenant_id, user_id, regulation, external_ref, version, updated_at, has_vendors) from '$work/staging_users.tsv'
\copy consent.staging_consents (source, tenant_id, user_id, regulation, item_kind, item_id, lawful_basis, status, raw_status, option_type, valid_from, valid_until, changed_at) from '$work/staging_consents.tsv'
analyze consent.staging_users, consent.staging_consents, consent.staging_preferences;
insert into consent.reconciliation_runs (source, mode, snapshot_time) values ('file', 'repair', '$snapshot_time');
analyze consent.reconciliation_drift;
select consent.reconcile_diff(currval('consent.reconciliation_runs_id_seq'), '$snapshot_time', null);
select consent.reconcile_repair(currval('consent.reconciliation_runs_id_seq'), '$snapshot_time', true, null);
SQL
raw_end=$(date +%s.%N)
raw_s=$(python3 -c "print(round($raw_end - $raw_start, 2))")

cat <<REPORT

== consent-sync reconciliation benchmark ($mode build, $users users x 8 purposes, drift share $drift, $(nproc) cores)
expected:  $(cat "$work/expected.txt")
found:     $found
agent:     ${run_s} s wall, peak RSS ${run_mib} MiB (stored state loaded beforehand in ${load_s} s)
plain SQL: ${raw_s} s (COPY of pre-normalized rows + the same diff and repair)
ratio agent / plain SQL: $(python3 -c "print(f'{$run_s / $raw_s:.2f}')")
REPORT
[ "$run_rc" = 0 ] || { echo "reconcile exited $run_rc"; cat "$work/err.log"; exit 1; }
found_counts=$(python3 -c "import json; r=json.load(open('$work/out.json')); print(' '.join(f'{k}={v}' for k,v in sorted(r['drift'].items())))")
expected_counts=$(tr ' ' '\n' < "$work/expected.txt" | sort | tr '\n' ' ' | sed 's/ $//; s/^ //')
[ "$found_counts" = "$expected_counts" ] || { echo "drift found ($found_counts) is not the drift generated ($expected_counts)"; exit 1; }
