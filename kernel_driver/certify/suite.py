"""The checks in order, and running one: its record, whatever happens inside it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kernel_driver.certify.e1_email import check_email
from kernel_driver.certify.harness import Certification
from kernel_driver.certify.q1_idempotency import check_idempotency
from kernel_driver.certify.q2_crash_recovery import check_crash_recovery
from kernel_driver.certify.q3_scheduler_sla import check_scheduler_sla
from kernel_driver.certify.records import CheckFailed, CheckRecord, utc_now
from kernel_driver.certify.ux1_run_details import check_run_details
from kernel_driver.certify.ux2_retry import check_retry
from kernel_driver.certify.v1_voice import check_voice
from kernel_driver.frozen import CHECK_IDS


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    run: Callable[[Certification, CheckRecord], None]


CHECKS = (
    Check("Q1", "idempotency: no duplicate outbox rows or provider calls", check_idempotency),
    Check("Q2", "crash recovery: nothing re-sent, every item terminal", check_crash_recovery),
    Check("Q3", "scheduler SLA: jobs picked up and done within 120 s", check_scheduler_sla),
    Check("E1", "e-mail received with provider_message_id stored", check_email),
    Check("V1", "voice call attempted with its call id stored", check_voice),
    Check("UX1", "run, jobs and outbox visible (run_details, runs show)", check_run_details),
    Check("UX2", "retry creates a linked run for the failed contacts", check_retry),
)
assert tuple(check.id for check in CHECKS) == CHECK_IDS, "kernel_driver/frozen.py lists the checks"


def run_check(cert: Certification, check: Check) -> CheckRecord:
    record = CheckRecord(check.id, check.title, started_at=utc_now())
    started = time.monotonic()
    try:
        check.run(cert, record)
        cert.expect_only_own_workers(record)
        record.status = "PASS"
    except CheckFailed as failure:
        record.reason = str(failure)
    except Exception as exc:  # a refusal or error on the way is a failed check; it says why
        record.reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        cert.kill_daemons()
    record.ended_at = utc_now()
    record.duration_s = round(time.monotonic() - started, 3)
    cert.collect_ids(record)
    return record
