"""`python -m bench run [--smoke] [--only a,b] [--note TEXT]` and `python -m bench render JSON`.

A full run writes bench/results/latest.json, the generated section of docs/benchmarks.md and
docs/img/benchmarks.png. `--smoke` (small sizes) writes the same three into a temporary
directory and touches nothing committed. A failed scenario is recorded and the run goes on; the
exit code is then 1."""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bench import report
from bench.config import Sizes, server_dsn, sizes
from bench.pg import ROOT, server_version
from bench.targets import evaluate

SCENARIOS = ("floor", "noop", "peers", "latency", "small", "growth", "fair", "pickup", "console", "profile")


@dataclass(frozen=True)
class Context:
    server_dsn: str
    sizes: Sizes
    log_dir: Path


def _commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return result.stdout.strip() or "?"


@click.group()
def main() -> None:
    """The execution kernel's benchmark (issue 8, item 6)."""


@main.command()
@click.option("--smoke", is_flag=True, help="Small sizes; write into a temporary directory only.")
@click.option("--only", default=",".join(SCENARIOS), show_default=True, help="Scenarios to run, comma-separated.")
@click.option("--output-dir", type=click.Path(path_type=Path), help="Write latest.json, benchmarks.md and "
              "benchmarks.png here instead of bench/results, docs and docs/img.")
@click.option("--note", default="", help="A line shown above the generated tables (e.g. PRELIMINARY).")
def run(smoke: bool, only: str, output_dir: Path | None, note: str) -> None:
    """Run the scenarios on one Postgres (KERNEL_BENCH_DSN, else KERNEL_TEST_DSN, else local)."""
    chosen = [name.strip() for name in only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        raise click.BadParameter(f"unknown scenarios: {', '.join(unknown)}", param_hint="--only")
    if smoke and output_dir is None:
        output_dir = Path(tempfile.mkdtemp(prefix="kernel-bench-smoke-"))
    if output_dir is not None:
        json_path, doc_path, png_path = (output_dir / "latest.json", output_dir / "benchmarks.md",
                                         output_dir / "benchmarks.png")
    else:
        json_path = ROOT / "bench" / "results" / "latest.json"
        doc_path, png_path = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "img" / "benchmarks.png"
    log_dir = Path(tempfile.mkdtemp(prefix="kernel-bench-logs-"))
    dsn = server_dsn()
    ctx = Context(dsn, sizes(smoke), log_dir)
    started = time.time()
    results: dict[str, Any] = {
        "meta": {"kind": "smoke" if smoke else "full", "note": note, "commit": _commit(),
                 "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                 "server_version": server_version(dsn), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "sizes": ctx.sizes.__dict__, "scenarios": chosen},
        "scenarios": {},
    }
    failed = False
    for name in chosen:
        click.echo(f"bench: {name} …", err=True)
        t = time.time()
        try:
            module = importlib.import_module(f"bench.scenarios.{name}")
            results["scenarios"][name] = module.run(ctx)
        except Exception as exc:  # a broken scenario is reported, the others still run
            failed = True
            results["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        click.echo(f"bench: {name} done in {time.time() - t:.1f} s", err=True)
    results["meta"]["duration_s"] = time.time() - started
    results["targets"] = evaluate(results)
    report.write_json(results, json_path)
    report.update_doc(results, ROOT / "docs" / "benchmarks.md", doc_path)
    try:
        report.plot(results, png_path)
    except ImportError:
        click.echo("bench: matplotlib is not installed (make bench-deps): no plot", err=True)
    click.echo(report.render(results))
    click.echo(f"bench: wrote {json_path}, {doc_path}, {png_path} in {results['meta']['duration_s']:.0f} s "
               f"(daemon logs in {log_dir})", err=True)
    raise SystemExit(1 if failed else 0)


@main.command()
@click.argument("result", type=click.Path(exists=True, path_type=Path))
@click.option("--plot/--no-plot", default=True)
def render(result: Path, plot: bool) -> None:
    """Regenerate docs/benchmarks.md's section (and the plot) from a result file."""
    import json

    results = json.loads(result.read_text())
    report.update_doc(results, ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "benchmarks.md")
    if plot:
        report.plot(results, ROOT / "docs" / "img" / "benchmarks.png")
