"""The hot path alone, for A/B between kernel versions: `python -m bench.step_ab TREE...`
(AB_WHAT=deploy: deploy_campaign instead).

For each sample and each tree (a checkout of this repository), a fresh database migrated by that
tree's `kernel-driver migrate`, a 20,000-contact noop campaign deployed, then driven to the end by
`worker_step` from one session (claim 2 jobs, dispatch 500 items a step, record them sent with
the next step), timing only the `worker_step` calls. Trees alternate within each sample, so the
machine's drift falls on both. Prints items/s per tree and sample, and each later tree's rate
over the first's (median of the per-sample ratios)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

from bench.config import server_dsn
from bench.pg import SCHEMA, connect, deploy, fresh_database, scalar
from kernel_driver.testing.seed import seed_campaign

STEP = (
    "SELECT kind, job_id, item_id FROM {s}.worker_step(%s::text, 30::numeric, %s::uuid[], %s::uuid[],"
    " %s::text[], %s::text[], %s::text[], %s::text[], %s::uuid[], '{{}}'::uuid[], '{{}}'::text[],"
    " '{{}}'::uuid[], %s::integer, %s::integer, '{{}}'::text[], NULL::uuid[])"
)


def migrate(tree: Path, dsn: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # From the tree itself: `python -m` puts the working directory ahead of PYTHONPATH.
    subprocess.run([sys.executable, "-m", "kernel_driver", "--dsn", dsn, "migrate"], env=env, check=True,
                   capture_output=True, cwd=tree)


def drive(conn: psycopg.Connection, contacts: int, want: int = 500) -> float:
    query = STEP.format(s=SCHEMA)
    held: set[uuid.UUID] = set()
    results: list[uuid.UUID] = []
    complete: list[uuid.UUID] = []
    spent = 0.0
    done = 0
    while True:
        started = time.perf_counter()
        claim = max(0, 2 - len(held) + len(complete))
        found = conn.execute(query, ["ab", list(held), results, ["sent"] * len(results),
                                     [f"pm-{r}" for r in results], [None] * len(results),
                                     [None] * len(results), complete, want, claim]).fetchall()
        spent += time.perf_counter() - started
        done += len(results)
        results, complete = [], []
        for kind, job_id, item_id in found:
            if kind == "job":
                held.add(job_id)
            elif kind == "item":
                results.append(item_id)
            elif kind == "done":
                held.discard(job_id)
        if not results:
            complete = list(held)
            if not held and not any(kind == "job" for kind, _, _ in found):
                break
    if done != contacts:
        raise SystemExit(f"recorded {done} of {contacts}")
    return contacts / spent


def deploys(conn: psycopg.Connection, count: int = 2000) -> float:
    tenant, workspace = uuid.uuid4(), uuid.uuid4()
    with_tenant = scalar(
        conn, "SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'tenant_id'",
        [f"{SCHEMA}.campaign_audience"])
    conn.execute(f"INSERT INTO {SCHEMA}.provider_configs (workspace_id, channel, provider, tenant_id)"
                 " VALUES (%s, 'email', 'noop', %s)", [workspace, tenant])
    conn.execute(f"INSERT INTO {SCHEMA}.contacts (tenant_id, workspace_id, email) SELECT %s, %s,"
                 " 'c' || g || '@ab.example.test' FROM generate_series(1, %s) AS g", [tenant, workspace, count])
    conn.execute(f"INSERT INTO {SCHEMA}.campaigns (tenant_id, workspace_id, name, channel, content)"
                 " SELECT %s, %s, 'one ' || g, 'email', jsonb_build_object('subject', 's', 'text', 't')"
                 " FROM generate_series(1, %s) AS g", [tenant, workspace, count])
    tenant_column = ", tenant_id" if with_tenant else ""
    conn.execute(f"INSERT INTO {SCHEMA}.campaign_audience (campaign_id, contact_id{tenant_column})"
                 f" SELECT c.id, k.id{', k.tenant_id' if with_tenant else ''}"
                 f" FROM (SELECT id, row_number() OVER (ORDER BY name) AS r FROM {SCHEMA}.campaigns) AS c"
                 f" JOIN (SELECT id, tenant_id, row_number() OVER (ORDER BY email) AS r FROM {SCHEMA}.contacts) AS k"
                 " USING (r)")
    conn.execute(f"ANALYZE {SCHEMA}.contacts, {SCHEMA}.campaigns, {SCHEMA}.campaign_audience")
    ids = [r[0] for r in conn.execute(f"SELECT id FROM {SCHEMA}.campaigns ORDER BY name")]
    spent = 0.0
    for campaign in ids:
        started = time.perf_counter()
        conn.execute(f"SELECT {SCHEMA}.deploy_campaign(%s)", [campaign])
        spent += time.perf_counter() - started
    return count / spent


def main() -> None:
    trees = [Path(t).resolve() for t in sys.argv[1:]]
    samples = int(os.environ.get("AB_SAMPLES", "7"))
    contacts = int(os.environ.get("AB_CONTACTS", "20000"))
    rates: dict[Path, list[float]] = {t: [] for t in trees}
    for sample in range(samples):
        for tree in trees if sample % 2 == 0 else reversed(trees):
            with fresh_database(server_dsn(), "stepab") as dsn:
                migrate(tree, dsn)
                with connect(dsn) as conn:
                    version = scalar(conn, f"SELECT {SCHEMA}.kernel_version()")
                    if os.environ.get("AB_WHAT") == "deploy":
                        rates[tree].append(deploys(conn))
                    else:
                        seeded = seed_campaign(conn, SCHEMA, contacts=contacts, provider="noop")
                        deploy(conn, seeded.campaign_id)
                        conn.execute(f"ANALYZE {SCHEMA}.contacts")
                        rates[tree].append(drive(conn, contacts))
            print(f"sample {sample} {tree.name} ({version}): {rates[tree][-1]:,.0f} per s", flush=True)
    first = trees[0]
    for tree in trees:
        ratios = [b / a for a, b in zip(rates[first], rates[tree], strict=True)]
        print(f"{tree.name}: median {statistics.median(rates[tree]):,.0f} per s; "
              f"over {first.name} per sample {', '.join(f'{r:.3f}' for r in sorted(ratios))}; "
              f"median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
