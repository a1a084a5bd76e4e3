#!/usr/bin/env python3
"""Generates a Didomi snapshot for the reconciliation benchmark.

gen_snapshot.py N DRIFT OUT_DIR writes:
  base.ndjson     N users x 8 purposes (the stored state; base_*.tsv the same as staging rows)
  drifted.ndjson  the same users with DRIFT share changed: a purpose flipped on DRIFT of the users,
                  DRIFT/4 new users, DRIFT/4 users gone (under the 5 % removal guard)
  staging_*.tsv   the drifted snapshot as staging rows, for the raw-SQL comparison (COPY + diff + repair)
  expected.txt    the drift counts the benchmark must find
"""
import json, random, sys

n = int(sys.argv[1]); drift = float(sys.argv[2]); out = sys.argv[3]
random.seed(42)
purposes = ["newsletter", "sms_offers", "analytics", "geolocation_data", "profiling", "partners", "push", "ads"]

def user(i, version, flip=None):
    ps = []
    for k, p in enumerate(purposes):
        enabled = (i + k) % 3 != 0
        if flip == k:
            enabled = not enabled
        ps.append({"id": p, "enabled": enabled})
    return {"id": f"u{i}", "organization_id": "bench", "organization_user_id": f"u{i}@example.com",
            "version": version, "created_at": "2024-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z",
            "consents": {"purposes": ps}}

changed = set(random.sample(range(n), int(n * drift)))
gone = set(random.sample(sorted(set(range(n)) - changed), int(n * drift / 4)))
new = range(n, n + int(n * drift / 4))

with open(f"{out}/base.ndjson", "w") as base, open(f"{out}/drifted.ndjson", "w") as drifted, \
     open(f"{out}/staging_users.tsv", "w") as su, open(f"{out}/staging_consents.tsv", "w") as sc, \
     open(f"{out}/base_users.tsv", "w") as bu, open(f"{out}/base_consents.tsv", "w") as bc:
    def stage(u, su=su, sc=sc):
        su.write(f"didomi\tbench\t{u['id']}\tgdpr\t{u['organization_user_id']}\t{u['version']}\t{u['updated_at']}\tf\n")
        for p in u["consents"]["purposes"]:
            status = "granted" if p["enabled"] else "denied"
            sc.write(f"didomi\tbench\t{u['id']}\tgdpr\tpurpose\t{p['id']}\tconsent\t{status}\t{str(p['enabled']).lower()}\t\\N\t\\N\t\\N\t{u['updated_at']}\n")
    for i in range(n):
        base.write(json.dumps(user(i, 1)) + "\n")
        stage(user(i, 1), bu, bc)
        if i in gone:
            continue
        u = user(i, 2, flip=(i % 8) if i in changed else None)
        if i not in changed:
            u["version"] = 1
        drifted.write(json.dumps(u) + "\n")
        stage(u)
    for i in new:
        u = user(i, 1)
        drifted.write(json.dumps(u) + "\n")
        stage(u)

with open(f"{out}/expected.txt", "w") as f:
    f.write(f"consent_different={len(changed)} user_missing_here={len(new)} consent_missing={len(new) * 8} "
            f"user_missing_at_source={len(gone)}\n")
