"""The certification page's runner: `kernel-driver certify` in a child process, one at a time,
its report lines kept for the page and its evidence file kept for download.

A child process, not a thread: the harness starts daemons, sinks and signal handlers of its
own, and a failed check must not take the console down with it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kernel_driver.config import Settings
from kernel_driver.db import require_dsn


@dataclass
class CertificationRun:
    checks: list[str]
    started_at: datetime
    lines: list[str] = field(default_factory=list)
    exit_code: int | None = None
    evidence: Path | None = None

    @property
    def running(self) -> bool:
        return self.exit_code is None

    @property
    def result(self) -> str:
        if self.running:
            return "running"
        return "passed" if self.exit_code == 0 else "failed"


class Certifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.latest: CertificationRun | None = None
        self._lock = threading.Lock()
        self._directory: Path | None = None  # made by the first run, removed by close()

    def start(self, checks: list[str]) -> CertificationRun:
        """Start a run of `checks` (ids from kernel_driver.frozen.CHECK_IDS); refused while one runs."""
        with self._lock:
            if self.latest is not None and self.latest.running:
                raise RuntimeError("a certification is running already: wait for it to end")
            run = self.latest = CertificationRun(checks, datetime.now(UTC))
            if self._directory is None:
                self._directory = Path(tempfile.mkdtemp(prefix="kernel-console-"))
        out = self._directory / f"evidence-{run.started_at:%Y%m%dT%H%M%S}.json"
        command = [sys.executable, "-m", "kernel_driver", "--dsn", require_dsn(self.settings),
                   "--schema", self.settings.schema, "certify", "--only", ",".join(checks), "--out", str(out)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._follow, args=(run, process, out), daemon=True).start()
        return run

    def _follow(self, run: CertificationRun, process: subprocess.Popen[str], out: Path) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            run.lines.append(line.rstrip("\n"))
        code = process.wait()
        run.evidence = out if out.exists() else None
        run.exit_code = code

    def close(self) -> None:
        """Remove the evidence files (the console is stopping)."""
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
