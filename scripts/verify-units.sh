#!/usr/bin/env bash
# systemd-analyze verify on every unit (ExecStart pointed at the built binary), and the service's
# exposure score from systemd-analyze security --offline=yes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null 2>&1 || {
  [ "$(id -u)" = 0 ] || { echo "systemd-analyze missing (apt-get install systemd)"; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
}
bin="$(swift build --show-bin-path)/consent-sync"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for unit in systemd/*; do
  sed "s|/usr/bin/consent-sync|$bin|g" "$unit" > "$work/$(basename "$unit")"
done
id consent-sync >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin consent-sync 2>/dev/null || true
status=0
for unit in "$work"/*; do
  # Any message about our unit is a problem, even when verify exits 0 (an ignored line, e.g. "Invalid
  # syntax", only warns); messages about units the container lacks are not ours.
  out=$(systemd-analyze verify "$unit" 2>&1 || true)
  problems=$(printf '%s\n' "$out" | grep -F "$(basename "$unit")" || true)
  if [ -n "$problems" ]; then echo "FAIL $(basename "$unit")"; printf '%s\n' "$problems"; status=1; else echo "ok   $(basename "$unit")"; fi
done
echo "exposure: $(systemd-analyze security --offline=yes "$work/consent-sync.service" 2>/dev/null | tail -1)"
exit $status
