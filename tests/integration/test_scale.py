"""A large campaign shared by several daemons, with memory that stays flat.

`make test` runs it with 50,000 contacts; `make test-slow` with 1,000,000 (KERNEL_TEST_SCALE_CONTACTS).
"""

from __future__ import annotations

import contextlib
import os
import time

from kernel_driver.queries import Kernel
from kernel_driver.testing.seed import seed_campaign
from tests.integration.daemon import item_counts, job_workers, run_status, start_daemon

CONTACTS = int(os.environ.get("KERNEL_TEST_SCALE_CONTACTS", "50000"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_large_campaign_is_shared_and_memory_stays_flat(conn, db_dsn, kernel_schema):
    seeded = seed_campaign(conn, kernel_schema, contacts=CONTACTS, provider="noop", unsubscribed_every=100)
    run_id = Kernel(conn, kernel_schema).deploy_campaign(seeded.campaign_id)
    daemons = [
        start_daemon(db_dsn, kernel_schema, "--until-idle", "--concurrency", "32",
                     "--log-level", "WARNING", "--worker-id", f"scale-{n}")
        for n in range(2)
    ]
    samples: dict[int, list[int]] = {d.pid: [] for d in daemons}
    while any(d.poll() is None for d in daemons):
        for d in daemons:
            if d.poll() is None:
                with contextlib.suppress(FileNotFoundError, StopIteration):
                    samples[d.pid].append(rss_kib(d.pid))
        time.sleep(0.5)
    for d in daemons:
        d.finish(timeout=None)

    assert item_counts(conn, [run_id]) == {"sent": seeded.reachable, "skipped": CONTACTS - seeded.reachable}
    assert run_status(conn, run_id) == "completed"
    assert job_workers(conn, run_id) == {"scale-0", "scale-1"}
    # Flat memory: no daemon grows by more than 30 MiB after its first seconds, whatever the audience.
    for rss in samples.values():
        settled = rss[len(rss) // 4:] or rss
        assert max(settled) - settled[0] < 30 * 1024, f"RSS grew from {settled[0]} to {max(settled)} KiB"
