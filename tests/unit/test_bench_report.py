"""The benchmark's report (bench/report.py): tables and the marker-delimited doc section. Pure:
needs neither npm, nor the bench venv, nor a database."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.profile_frames import top_frames
from bench.receiver import lognormal_mean_ms, lognormal_sigma
from bench.report import BEGIN, END, render, replace_section, update_doc

RESULTS = {
    "meta": {"kind": "full", "started": "2026-12-02 07:00 UTC", "server_version": "15.20", "cpus": 2,
             "commit": "abc1234", "duration_s": 12.5, "note": "PRELIMINARY"},
    "scenarios": {
        "floor": {"n": 20000, "msgs_per_s": 20000.0, "machine_cpu_s": 1.0},
        "noop": {"daemons_1": {"n": 20000, "concurrency": 16, "msgs_per_s": 3000.0, "peak_rss_mib": 41.0},
                 "daemons_2": {"n": 20000, "concurrency": 16, "msgs_per_s": 5000.0, "peak_rss_mib": 41.0,
                               "machine_cpu_s": 8.0},
                 "idle_start": {"exited_s": 0.33, "cpu_s": 0.21, "exit_code": 0}},
        "peers": {"procrastinate": {"n": 20000, "msgs_per_s": 500.0, "version": "3.10.0"},
                  "graphile_batched": {"skipped": "run `make bench-deps` (npm ci)"}},
        "latency": {"median_ms": 50, "p99_ms": 400, "mean_ms_expected": 74.6,
                    "runs": [{"concurrency": 64, "n": 5000, "msgs_per_s": 120.0, "ideal_per_s": 857.0, "ratio": 0.14,
                              "machine_cpu_s": 30.0, "daemons_exited_s": 20.0}]},
        "growth": {"error": "BenchError: a daemon exited 6"},
    },
}


def test_render_has_targets_tables_and_notes():
    text = render(RESULTS)
    assert "**PRELIMINARY**" in text
    assert "| noop, 1 daemon, × floor | >= 0.5 | 0.15× | **FAIL** |" in text
    assert "| noop, 1 daemon, × procrastinate | >= 20 | 6.00× | **FAIL** |" in text
    # machine CPU per message, and the rate two cores would give at that cost
    assert ("| floor: INSERT then UPDATE to sent, 500 rows per transaction | 20,000 | 20,000 | 1.00 | 50 | 40,000 |"
            in text)
    assert "| kernel-driver, noop, 2 daemons, `--concurrency 16` | 20,000 | 5,000 | 0.25 | 400 | 5,000 |" in text
    assert "| kernel-driver, noop, 1 daemon, `--concurrency 16` | 20,000 | 3,000 | 0.15 | – | – |" in text
    assert "exits after 0.33 s (0.21 s of its own CPU)" in text
    assert "skipped: run `make bench-deps` (npm ci)" in text
    assert "| 64 | 5,000 | 120 | 857 | 0.14 | 75% |" in text  # 30 CPU s in 20 s on 2 cores
    assert "- `growth`: BenchError: a daemon exited 6" in text
    assert "not measured" in text


def test_replace_section_between_markers_only():
    doc = f"# Measurements\n\nhand-written\n\n{BEGIN}\nold table\n{END}\n\n## After\nkept\n"
    out = replace_section(doc, "new table\n")
    assert "old table" not in out and "new table" in out
    assert out.startswith("# Measurements\n\nhand-written\n") and out.endswith("## After\nkept\n")
    assert replace_section(out, "new table\n") == out  # idempotent


def test_replace_section_appends_markers_when_missing():
    out = replace_section("# Measurements\n\ntext\n", "table")
    assert out == f"# Measurements\n\ntext\n\n{BEGIN}\ntable\n{END}\n"


def test_update_doc_writes_elsewhere_without_touching_the_source(tmp_path):
    source = tmp_path / "benchmarks.md"
    source.write_text("# M\n")
    target = tmp_path / "out" / "benchmarks.md"
    update_doc(RESULTS, source, target)
    assert source.read_text() == "# M\n"
    assert BEGIN in target.read_text()


def test_lognormal_parameters():
    assert abs(lognormal_mean_ms(50, 400) - 74.6) < 0.1
    assert lognormal_sigma(0, 0) == 0.0


def test_top_frames_from_collapsed_stacks():
    raw = ("MainThread (1);run (kernel_driver/worker.py:10);wait (psycopg/connection.py:5) 30\n"
           "MainThread (1);run (kernel_driver/worker.py:12) 10\n"
           "garbage\n")
    frames = top_frames(raw)
    assert frames["samples"] == 40
    assert frames["self"][0] == {"frame": "wait (psycopg/connection.py)", "share": 0.75}
    assert frames["inclusive"][0] == {"frame": "run (kernel_driver/worker.py)", "share": 1.0}
