"""The delivery protocol, model-checked (issue 12, item 5): model/delivery.pml through SPIN,
every interleaving of two daemons that crash, pause past their lease and lose their database
connection. The protocol as built passes; each mutant of it fails, so the checks can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[2] / "model" / "delivery.pml"


@pytest.fixture(scope="module")
def spin() -> str:
    found = shutil.which("spin")
    if found is None or shutil.which("gcc") is None:
        message = "spin (and gcc) are needed: apt-get install spin (.ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def verify(spin: str, directory: Path, *defines: str) -> str:
    """Generate the verifier for the model with `defines`, compile it, search every state."""
    model = directory / MODEL.name
    shutil.copy(MODEL, model)
    subprocess.run([spin, *defines, "-a", model.name], cwd=directory, check=True, capture_output=True, text=True)
    subprocess.run(["gcc", "-O2", "-w", "-DSAFETY", "-o", "pan", "pan.c"], cwd=directory, check=True)
    done = subprocess.run(["./pan", "-m1000000"], cwd=directory, capture_output=True, text=True, timeout=600)
    return done.stdout


@pytest.mark.parametrize("defines", [(), ("-DN=3",), ("-DDEDUP",)], ids=["smtp-like", "three-items", "webhook-like"])
def test_the_protocol_keeps_its_promises_in_every_interleaving(spin, tmp_path, defines):
    report = verify(spin, tmp_path, *defines)
    assert "errors: 0" in report, report
    assert "depth too small" not in report  # the search covered everything
    stored = int(report.split(" states, stored")[0].split()[-1])
    assert stored > 10_000  # crashes, pauses and blips really were explored


@pytest.mark.parametrize(("mutant", "violation"), [
    ("-DRESEND_UNKNOWN", "assertion violated (delivered[i]<=1)"),
    ("-DNO_FENCING", "invalid end state"),
])
def test_each_mutant_is_caught(spin, tmp_path, mutant, violation):
    report = verify(spin, tmp_path, mutant)
    assert "errors: 1" in report and violation in report, report
