#!/usr/bin/env bash
# Ingest benchmark: the agent (auth on, durable PostgreSQL) against pgbench's ceiling for the same SQL,
# in the same run, on the same cluster.
#
#   bench/ingest.sh                 # release build, 30 s per phase, 16 and 64 connections, then a mix
#   bench/ingest.sh --smoke         # debug build, 5 s phases (what CI runs; figures printed, not asserted)
#   DURATION=60 USERS=1000000 bench/ingest.sh
#   BENCH_BIN=/path/to/consent-sync bench/ingest.sh   # measure a binary built beforehand
#   PROFILE=1 bench/ingest.sh       # also where PostgreSQL's time goes at 64 connections, statement by
#                                   # statement, nested ones included (pg_stat_statements; costs a little)
#
# Prints webhooks/s, p50/p99/max latency, the agent's peak RSS, the pgbench ceilings (one webhook per
# transaction, 50 per transaction) and the ratios; then checks the stored state against the deliveries.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

mode=release
duration=${DURATION:-30}
users=${USERS:-1000000}
if [ "${1:-}" = "--smoke" ]; then mode=debug; duration=${DURATION:-5}; fi

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
[ -x /usr/bin/time ] || need+=(time)
ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else echo "missing: ${need[*]} (apt-get install them)"; exit 1; fi
fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

if [ -n "${BENCH_BIN:-}" ]; then
  # A binary built beforehand (to compare two builds on one machine, one after the other).
  bin=$(realpath "$BENCH_BIN"); mode="$mode, given binary"
  echo "== using $bin"
else
  echo "== building ($mode)"
  # Release as shipped (README, "Running it in production"): the Swift runtime linked statically.
  build=(-c "$mode"); [ "$mode" = release ] && build+=(--static-swift-stdlib)
  swift build "${build[@]}" --product consent-sync >/dev/null
  bin="$(swift build "${build[@]}" --show-bin-path)/consent-sync"
fi

work=$(mktemp -d /tmp/consent-sync-bench.XXXXXX)
chmod 755 "$work"
as_pg=()
if [ "$(id -u)" = 0 ]; then chown postgres "$work"; as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --); fi
cleanup() {
  [ -n "${agent:-}" ] && kill -TERM "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true
  [ -n "${pg:-}" ] && kill -INT "$pg" 2>/dev/null && wait "$pg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== PostgreSQL: durable settings (fsync on, synchronous_commit on), unix socket only"
"${as_pg[@]}" "$pgbin/initdb" -D "$work/data" --auth=trust -U postgres >/dev/null
profile=()
[ "${PROFILE:-0}" = 1 ] && profile=(-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all
                                   -c pg_stat_statements.max=1000 -c track_functions=pl)
"${as_pg[@]}" "$pgbin/postgres" -D "$work/data" -c listen_addresses='' -c unix_socket_directories="$work" \
  -c fsync=on -c synchronous_commit=on -c max_connections=200 -c shared_buffers=512MB "${profile[@]}" >"$work/pg.log" 2>&1 &
pg=$!
for _ in $(seq 1 100); do "$pgbin/pg_isready" -q -h "$work" && break; sleep 0.1; done
psql() { command psql -X -q -v ON_ERROR_STOP=1 -h "$work" -U postgres "$@"; }
psql -c "create database bench"
[ "${PROFILE:-0}" = 1 ] && psql -d bench -c "create extension pg_stat_statements"
export DATABASE_URL="postgres://postgres@localhost:5432/bench?host=$work"

echo "== agent: migrate, OAuth client, token, serve (auth on)"
"$bin" migrate >/dev/null
creds=$("$bin" clients create bench)
client_id=$(printf '%s\n' "$creds" | awk '/client_id/ {print $2}')
client_secret=$(printf '%s\n' "$creds" | awk '/client_secret/ {print $2}')
port=${PORT:-18181}
CONSENT_SYNC_LOG_LEVEL=warning "$bin" serve --port "$port" >"$work/agent.log" 2>&1 &
agent=$!
for _ in $(seq 1 200); do curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
token=$(curl -fsS -u "$client_id:$client_secret" -d grant_type=client_credentials "http://127.0.0.1:$port/oauth/token" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
idle_rss=$(awk '/VmRSS/ {print $2}' /proc/$agent/status)

run_wrk() {  # run_wrk CONNECTIONS DUP OOO [DELAY_MS]
  BENCH_USERS=$users BENCH_DUP=$2 BENCH_OOO=$3 BENCH_TOKEN=$token BENCH_DELAY_MS=${4:-0} \
    /usr/bin/time -o "$work/wrk.time" -f '%U %S' \
    wrk -t 2 -c "$1" -d "${duration}s" --timeout 10s -s bench/didomi.lua "http://127.0.0.1:$port" | grep '^RESULT'
}
field() { printf '%s\n' "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k {print $2}'; }

echo "== agent: unique user.updated deliveries, $users users, ${duration}s per phase"
r16=$(run_wrk 16 0 0); echo "16 connections: $r16"
# CPU time (user + system) of the agent and of every PostgreSQL process of the cluster, in clock ticks.
ticks() { local t=0 p u k; for p in "$@"; do read -r u k < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo "0 0"); t=$((t + u + k)); done; echo "$t"; }
pg_ticks() { ticks "$pg" $(pgrep -P "$pg"); }
# The whole machine's CPU (all cores, in clock ticks): busy, idle, and stolen by the hypervisor.
machine() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $5 + $6, $9}' /proc/stat; }
a0=$(ticks "$agent"); p0=$(pg_ticks); read -r busy0 idle0 steal0 < <(machine)
[ "${PROFILE:-0}" = 1 ] && psql -d bench -c "select pg_stat_statements_reset(), pg_stat_reset()" >/dev/null
r64=$(run_wrk 64 0 0); echo "64 connections: $r64"
a1=$(ticks "$agent"); p1=$(pg_ticks); read -r busy1 idle1 steal1 < <(machine)
read -r wrk_user wrk_sys < "$work/wrk.time"
if [ "${PROFILE:-0}" = 1 ]; then
  # Execution time per webhook of each statement (a statement's time includes the statements it runs),
  # and the time each PL/pgSQL function spends in its own code and statements (not in the functions it calls).
  psql -d bench -v n="$(field "$r64" requests)" > "$work/profile.txt" <<'SQL'
\pset pager off
\pset footer off
select round((total_exec_time * 1000 / :n)::numeric, 1) as "µs/webhook", calls,
       round((rows::numeric / greatest(calls, 1)), 1) as "rows/call",
       case when toplevel then 'top' else 'nested' end as level,
       left(regexp_replace(query, '\s+', ' ', 'g'), 110) as statement
  from pg_stat_statements where total_exec_time * 1000 / :n >= 1
 order by total_exec_time desc limit 25;
select funcname as function, calls, round((self_time * 1000 / :n)::numeric, 1) as "own µs/webhook",
       round((total_time * 1000 / :n)::numeric, 1) as "total µs/webhook"
  from pg_stat_user_functions where calls > 0 order by self_time desc;
SQL
fi
# Half of the saturated rate, paced: 32 connections, each pausing after every response.
half_target=$(python3 -c "print(round($(field "$r64" rps) / 2))")
pause_ms=$(python3 -c "print(max(1, int(32 * 1000 / max(1, $half_target)) - 1))")
echo "== agent: paced at about half that rate ($half_target webhooks/s: 32 connections, ${pause_ms} ms pause)"
rhalf=$(run_wrk 32 0 0 "$pause_ms"); echo "half rate:      $rhalf"
echo "== agent: mix with 10 % duplicates and 10 % out-of-order deliveries, 64 connections"
rmix=$(run_wrk 64 0.10 0.10); echo "mix:            $rmix"
peak_rss=$(awk '/VmHWM/ {print $2}' /proc/$agent/status)

echo "== checking the stored state against the deliveries"
psql -d bench -t -A <<'SQL' > "$work/check.txt"
with received as (
    select user_id, max(substring(dedup_key from ':v([0-9]+):')::bigint) as newest
      from consent.deliveries where outcome in ('applied', 'stale', 'duplicate') group by user_id),
bad_versions as (
    select count(*) as n from received r join consent.user_snapshots s using (user_id)
     where s.version <> r.newest),
newest_body as (
    select distinct on (d.user_id) d.user_id, convert_from(d.body, 'UTF8')::jsonb as body
      from consent.deliveries d where d.outcome = 'applied' order by d.user_id, d.id desc),
expected as (
    select b.user_id, p->>'id' as purpose, case when (p->>'enabled')::boolean then 'granted' else 'denied' end as status
      from newest_body b, jsonb_array_elements(b.body->'parameters'->'new_entity'->'consents'->'purposes') p),
actual as (
    select user_id, purpose_id as purpose, status from consent.current_consents
     where source = 'didomi' and tenant_id = 'bench' and lawful_basis = 'consent'),
diff as (
    select count(*) as n from ((select * from expected except select * from actual)
                               union all (select * from actual except select * from expected)) x)
select (select n from bad_versions) || ' ' || (select n from diff) || ' ' ||
       (select count(*) from consent.deliveries where outcome = 'applied') || ' ' ||
       (select count(*) from consent.deliveries where outcome = 'duplicate') || ' ' ||
       (select count(*) from consent.deliveries where outcome = 'stale');
SQL
read -r bad_versions bad_rows applied duplicates stale < "$work/check.txt"
echo "applied=$applied duplicate=$duplicates stale=$stale; users whose version is not the newest received: $bad_versions; consent rows differing from the newest applied delivery: $bad_rows"

echo "== pgbench ceiling on the same cluster (equivalent SQL per webhook)"
psql -d bench <<'SQL'
create schema ceiling;
create table ceiling.keys (key text primary key);
create table ceiling.users (user_id bigint primary key, version bigint, updated_at timestamptz);
create table ceiling.consents (user_id bigint, purpose text, status boolean, seen bigint, primary key (user_id, purpose));
create table ceiling.payloads (id bigserial primary key, body jsonb);
create table ceiling.sample as select (select jsonb_agg(jsonb_build_object('id', 'purpose-' || g, 'enabled', true, 'note', repeat('x', 40))) from generate_series(1, 24) g) as payload;
SQL
pgb() {  # pgb SCRIPT CLIENTS
  "$pgbin/pgbench" -n -h "$work" -U postgres -f "bench/$1" -c "$2" -j 2 -T "$duration" bench 2>/dev/null \
    | awk '/^tps/ {print $3; exit}'
}
one1=$(pgb pgbench-one.sql 1)
one4=$(pgb pgbench-one.sql 4)
one16=$(pgb pgbench-one.sql 16)
batch1=$(pgb pgbench-batch.sql 1)
batch4=$(pgb pgbench-batch.sql 4)
r1() { python3 -c "print(round($1, 1))"; }
one1=$(r1 "$one1"); one4=$(r1 "$one4"); one16=$(r1 "$one16")
batch1w=$(r1 "$batch1 * 50"); batch4w=$(r1 "$batch4 * 50")
one_best=$(python3 -c "print(max($one1, $one4, $one16))")

rps16=$(field "$r16" rps); rps64=$(field "$r64" rps); rpsmix=$(field "$rmix" rps)
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
mem() { python3 -c "print(f'{$1 / 1024:.1f} MiB ({$1 * 1024 / 1e6:.1f} MB)')"; }
cpu_ms() { python3 -c "print(f'{($2 - $1) * 1000 / $(getconf CLK_TCK) / max(1, $(field "$r64" requests)):.3f}')"; }
cat <<REPORT

== consent-sync ingest benchmark ($mode build, ${duration}s phases, $users users, agent and PostgreSQL on $(nproc) cores)
agent, 16 connections:  $rps16 webhooks/s  p50 $(field "$r16" p50_ms) ms  p99 $(field "$r16" p99_ms) ms  max $(field "$r16" max_ms) ms  non-2xx $(field "$r16" non2xx)
agent, 64 connections:  $rps64 webhooks/s  p50 $(field "$r64" p50_ms) ms  p99 $(field "$r64" p99_ms) ms  max $(field "$r64" max_ms) ms  non-2xx $(field "$r64" non2xx)
agent, paced at half rate, 32 connections: $(field "$rhalf" rps) webhooks/s  p50 $(field "$rhalf" p50_ms) ms  p99 $(field "$rhalf" p99_ms) ms  max $(field "$rhalf" max_ms) ms
agent, mix (10% dup, 10% out of order), 64 connections: $rpsmix webhooks/s  p99 $(field "$rmix" p99_ms) ms
agent RSS: idle $(mem "$idle_rss"), peak $(mem "$peak_rss")
CPU per webhook at 64 connections: PostgreSQL $(cpu_ms "$p0" "$p1") ms, agent $(cpu_ms "$a0" "$a1") ms, load generator (wrk) $(python3 -c "print(f'{($wrk_user + $wrk_sys) * 1000 / max(1, $(field "$r64" requests)):.3f}')") ms
CPU of the machine at 64 connections: $(python3 -c "b, i, s = $busy1 - $busy0, $idle1 - $idle0, $steal1 - $steal0; t = max(1, b + i + s); print(f'{100 * b / t:.1f} % busy, {100 * i / t:.1f} % idle, {100 * s / t:.1f} % stolen by the hypervisor')") ($(nproc) cores)
pgbench ceiling, 1 webhook per transaction:    1 client $one1, 4 clients $one4, 16 clients $one16 webhooks/s
pgbench ceiling, 50 webhooks per transaction:  1 client $batch1w, 4 clients $batch4w webhooks/s
ratio agent(64) / pgbench one-per-transaction, best ($one_best): $(ratio "$rps64" "$one_best")
ratio agent(64) / pgbench one-per-transaction, 16 clients:  $(ratio "$rps64" "$one16")
ratio agent(64) / pgbench batched, 4 clients:               $(ratio "$rps64" "$batch4w")
state check: $bad_versions users with a wrong version, $bad_rows differing consent rows (both must be 0)
REPORT
if [ "${PROFILE:-0}" = 1 ]; then
  echo; echo "== where PostgreSQL's time went at 64 connections (pg_stat_statements, execution time per webhook)"
  cat "$work/profile.txt"
fi
[ "$bad_versions" = 0 ] && [ "$bad_rows" = 0 ] || { echo "stored state does not match the deliveries"; exit 1; }
