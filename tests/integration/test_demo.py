"""`kernel-driver demo` as `make demo` runs it, against the test database (KERNEL_DSN)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kernel_driver.certify import CHECK_IDS
from kernel_driver.demo import EMAIL_CONTACTS, VOICE_CONTACTS

REACHABLE_EMAILS = 940  # 1,000 contacts less every 25th (unsubscribed) and every 40th (no address)


def run_demo(dsn: str, schema: str, data_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERNEL_DSN": dsn, "KERNEL_SCHEMA": schema}
    return subprocess.run([sys.executable, "-m", "kernel_driver", "demo", "--data-dir", str(data_dir)],
                          check=False, env=env, capture_output=True, text=True, timeout=timeout)


def summary_row(stdout: str, channel: str) -> list[str]:
    (line,) = [line for line in stdout.splitlines() if line.startswith(f"  {channel} ")]
    return line.split()


def test_demo_sends_everything_and_certifies(db_dsn: str, kernel_schema: str, tmp_path: Path) -> None:
    env = {**os.environ, "KERNEL_DSN": db_dsn, "KERNEL_SCHEMA": kernel_schema}
    demo = subprocess.Popen([sys.executable, "-m", "kernel_driver", "demo", "--data-dir", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert demo.stdout is not None
    lines = []
    for line in demo.stdout:  # the console is up while the demo runs: sign in and look
        lines.append(line)
        if line.startswith("console:   http://"):
            address = line.split()[1]
            browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
            with browser.open(address, timeout=10) as page:
                assert page.status == 200 and "demo e-mail" in page.read().decode()
            break
    else:
        raise AssertionError("no console address: " + "".join(lines))
    rest, errors = demo.communicate(timeout=120)
    assert demo.returncode == 0, rest[-3000:] + errors[-3000:]
    out = "".join(lines) + rest
    assert (tmp_path / "console-tokens").stat().st_mode & 0o777 == 0o600
    with pytest.raises(urllib.error.URLError):  # and gone once it ended
        urllib.request.urlopen(address, timeout=5)
    assert "kernel:    " in out and "(already migrated)" in out
    # RUN ID STATUS SENT SKIPPED FAILED UNKNOWN PENDING ITEMS ITEMS/S
    email, voice = summary_row(out, "email"), summary_row(out, "voice")
    skipped = str(EMAIL_CONTACTS - REACHABLE_EMAILS)
    assert email[2:9] == ["completed", str(REACHABLE_EMAILS), skipped, "0", "0", "0", str(EMAIL_CONTACTS)]
    assert voice[2:9] == ["completed", str(VOICE_CONTACTS), "0", "0", "0", "0", str(VOICE_CONTACTS)]
    assert float(email[9]) > 0 and float(voice[9]) > 0
    assert f"sinks:     SMTP messages received {REACHABLE_EMAILS}, voice calls received {VOICE_CONTACTS}" in out
    assert f"evidence:  {tmp_path / 'evidence.json'}" in out
    assert "checks:    " + "  ".join(f"{check} PASS" for check in CHECK_IDS) in out
    assert out.rstrip().endswith("result:    PASS")
    evidence = json.loads((tmp_path / "evidence.json").read_text())
    assert evidence["summary"]["result"] == "PASS"
    assert evidence["kernel_version"] in out


def test_demo_without_a_database_is_one_error_line(tmp_path: Path) -> None:
    demo = run_demo("postgresql://nobody@127.0.0.1:1/none", "kernel", tmp_path, timeout=30)

    assert demo.returncode == 4
    assert demo.stderr.startswith("error: cannot connect to the database:")
    assert len(demo.stderr.splitlines()) == 1
