"""What the freeze gate and the certification harness both need to know, held once: the files
frozen besides the migrations, and the certification checks (docs/EXECUTION_KERNEL_FREEZE.md).
A leaf module: freeze and certify read it, neither imports the other for it."""

from __future__ import annotations

# Frozen besides every file in sql/migrations/.
FROZEN_PATHS = (
    "kernel_driver/queries.py",
    "kernel_driver/worker.py",
    "kernel_driver/providers/base.py",
    "kernel_driver/certify.py",
    "docs/EXECUTION_CONTRACT.md",
    "docs/EXECUTION_KERNEL_FREEZE.md",
)

# The seed's checks, in the order certify runs them; evidence must pass every one.
CHECK_IDS = ("Q1", "Q2", "Q3", "E1", "V1", "UX1", "UX2")
