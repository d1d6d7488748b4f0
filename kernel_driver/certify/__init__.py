"""`kernel-driver certify`: the seed's QA certification harness, run against a live database.

Checks (docs/certification.md says what each one proves), one module each: Q1 idempotency
(`q1_idempotency`), Q2 crash recovery (`q2_crash_recovery`), Q3 scheduler SLA
(`q3_scheduler_sla`), E1 e-mail (`e1_email`), V1 voice (`v1_voice`), UX1 run details
(`ux1_run_details`), UX2 retry (`ux2_retry`). Beside them: `records` (what a check records),
`harness` (the tenant, daemons, providers and waiting that the checks share), `suite` (the checks
in order), `evidence` (the document), `command` (the CLI).

Every check works in workspaces of its own under a certification tenant made up for this
invocation (random uuids): it seeds its own campaigns, contacts and provider configs there, drives
real `kernel-driver run` subprocesses against real provider servers (local sinks by default), and
reads the outcome back from the database. The daemons it starts are scoped to that tenant, so they
never claim a real job. The rows stay behind: they are the evidence (`purge_sql` removes them).
"""

from kernel_driver.certify.command import certify, real_provider, select_checks
from kernel_driver.certify.evidence import (
    EVIDENCE_FORMAT,
    frozen_file_digests,
    frozen_files,
    purge_sql,
)
from kernel_driver.certify.harness import SLA_SECONDS, RealProvider
from kernel_driver.certify.q2_crash_recovery import Q2_CONCURRENCY
from kernel_driver.certify.records import CheckRecord, percentile, spread, utc_now
from kernel_driver.frozen import CHECK_IDS

__all__ = [
    "CHECK_IDS", "EVIDENCE_FORMAT", "Q2_CONCURRENCY", "SLA_SECONDS", "CheckRecord", "RealProvider", "certify",
    "frozen_file_digests", "frozen_files", "percentile", "purge_sql", "real_provider", "select_checks", "spread",
    "utc_now",
]
