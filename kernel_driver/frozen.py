"""What the freeze gate and the certification harness both need to know, held once: the files
frozen besides the migrations, and the certification checks (docs/EXECUTION_KERNEL_FREEZE.md).
A leaf module: freeze and certify read it, neither imports the other for it."""

from __future__ import annotations

# Frozen besides every file in sql/migrations/.
FROZEN_PATHS = (
    "kernel_driver/queries.py",
    "kernel_driver/worker.py",
    "kernel_driver/providers/base.py",
    # the certification harness, every module of it (tests/unit/test_freeze.py checks the list)
    "kernel_driver/certify/__init__.py",
    "kernel_driver/certify/command.py",
    "kernel_driver/certify/e1_email.py",
    "kernel_driver/certify/evidence.py",
    "kernel_driver/certify/harness.py",
    "kernel_driver/certify/q1_idempotency.py",
    "kernel_driver/certify/q2_crash_recovery.py",
    "kernel_driver/certify/q3_scheduler_sla.py",
    "kernel_driver/certify/records.py",
    "kernel_driver/certify/suite.py",
    "kernel_driver/certify/ux1_run_details.py",
    "kernel_driver/certify/ux2_retry.py",
    "kernel_driver/certify/v1_voice.py",
    "docs/EXECUTION_CONTRACT.md",
    "docs/EXECUTION_KERNEL_FREEZE.md",
)

# The seed's checks, in the order certify runs them; evidence must pass every one.
CHECK_IDS = ("Q1", "Q2", "Q3", "E1", "V1", "UX1", "UX2")
