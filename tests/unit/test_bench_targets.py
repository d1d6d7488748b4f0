"""The benchmark's target evaluation (bench/targets.py): pure, no database, no bench venv."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.config import sizes
from bench.targets import evaluate


def results(**scenarios):
    return {"meta": {}, "scenarios": scenarios}


def by_name(rows):
    return {row["target"].split(",")[0] + "," + row["target"].split(",")[1]: row for row in rows}


def test_every_target_is_not_measured_without_results():
    rows = evaluate(results())
    assert len(rows) == 13
    assert all(row["ok"] is None and row["value"] is None for row in rows)


def test_ratios_against_the_floor_and_procrastinate():
    rows = evaluate(results(
        floor={"msgs_per_s": 20000.0},
        noop={"daemons_1": {"msgs_per_s": 12000.0, "peak_rss_mib": 40.0},
              "daemons_2": {"msgs_per_s": 13000.0, "peak_rss_mib": 41.0}},
        peers={"procrastinate": {"msgs_per_s": 500.0}},
    ))
    one, two, procrastinate = rows[0], rows[1], rows[2]
    assert one["value"] == 0.6 and one["ok"] is True
    assert two["value"] == 0.65 and two["ok"] is False
    assert procrastinate["value"] == 24 and procrastinate["ok"] is True


def test_latency_growth_rss_pickup_small():
    rows = evaluate(results(
        latency={"runs": [{"concurrency": 16, "ratio": 0.1}, {"concurrency": 64, "ratio": 0.85},
                          {"concurrency": 256, "ratio": 0.5}]},
        growth={"runs": [{"n": 1_000_000, "msgs_per_s": 850.0, "peak_rss_mib": 160.0},
                         {"n": 10_000, "msgs_per_s": 1000.0, "peak_rss_mib": 40.0}]},
        pickup={"to_first_call_p99_ms": 99.9},
        small={"kernel": {"msgs_per_s": 1999.0, "deploys_per_s": 2500.0}},
    ))
    named = {row["target"]: row for row in rows}
    assert named["latency-bound, concurrency 64, × concurrency ÷ mean latency"]["ok"] is True
    assert named["latency-bound, concurrency 256, × concurrency ÷ mean latency"]["ok"] is False
    growth = next(row for row in rows if row["target"].startswith("growth"))
    assert "1,000,000 vs 10,000" in growth["target"] and growth["value"] == 0.85 and growth["ok"] is True
    rss = next(row for row in rows if row["target"].startswith("daemon peak RSS"))
    assert rss["value"] == 160.0 and rss["ok"] is False  # the worst size counts
    assert next(row for row in rows if row["target"].startswith("pick-up"))["ok"] is True
    assert named["one-contact campaigns, messages/s, 1 daemon"]["ok"] is False
    assert named["one-contact campaigns, deploys/s"]["ok"] is True


def test_fair_claims_targets():
    rows = evaluate(results(fair={"worst_small_s": 0.04, "throughput_ratio": 0.85}))
    named = {row["target"].split(":")[0] + ":" + row["target"].split(":")[1][:18]: row for row in rows
             if row["target"].startswith("fair")}
    assert [(row["value"], row["ok"]) for row in named.values()] == [(40.0, True), (0.85, False)]


def test_the_console_target_counts_only_a_million_items_and_its_slowest_run_page():
    pages = [{"median_ms": 12.0, "run_page": True}, {"median_ms": 120.0, "run_page": True},
             {"median_ms": 900.0, "run_page": False}, {"median_ms": 30.0, "run_page": True}]
    target = "console: slowest page of a run of 1,000,000 items, median (ms)"
    big = {row["target"]: row for row in evaluate(results(console={"n": 1_000_000, "pages": pages}))}[target]
    assert (big["value"], big["ok"]) == (120.0, False)
    small = {row["target"]: row for row in evaluate(results(console={"n": 2000, "pages": pages}))}[target]
    assert small["ok"] is None  # the smoke run's sizes prove nothing about a million


def test_latency_runs_last_long_enough_at_the_ideal_rate():
    from bench.scenarios.latency import items_for

    class Ctx:
        sizes = sizes(False, {})

    assert items_for(Ctx, 16) == 5000  # 214 a second for 10 s is less than the floor of 5,000
    assert 34_000 < items_for(Ctx, 256) < 35_000
    Ctx.sizes = sizes(True, {})
    assert items_for(Ctx, 256) == 300


def test_an_errored_scenario_is_not_measured():
    rows = evaluate(results(floor={"error": "BenchError: boom"}, noop={"daemons_1": {"msgs_per_s": 1.0}}))
    assert rows[0]["ok"] is None


def test_sizes_smoke_full_and_environment():
    assert sizes(False, {}).growth == (10_000, 100_000, 1_000_000)
    assert max(sizes(True, {}).growth) < 1_000_000
    custom = sizes(True, {"BENCH_N": "700", "BENCH_GROWTH": "1_000,5000", "BENCH_LATENCY_CONCURRENCY": "8"})
    assert (custom.n, custom.growth, custom.latency_concurrency) == (700, (1000, 5000), (8,))
