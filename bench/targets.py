"""Issue 8 item 7's targets (and issue 10's fair claims, issue 11's console pages), evaluated
against a result document (pure: no database)."""

from __future__ import annotations

from typing import Any


def _get(results: dict[str, Any], *path: Any) -> Any:
    node: Any = results.get("scenarios", {})
    for key in path:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node):
            node = node[key]
        else:
            return None
        if node is None:
            return None
    return node


def _rate(results: dict[str, Any], *path: Any) -> float | None:
    value = _get(results, *path, "msgs_per_s")
    return float(value) if isinstance(value, (int, float)) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ms(seconds: Any) -> float | None:
    return float(seconds) * 1000 if isinstance(seconds, (int, float)) else None


def _latency(results: dict[str, Any], concurrency: int) -> float | None:
    for run in _get(results, "latency", "runs") or []:
        if run.get("concurrency") == concurrency:
            ratio: float | None = run.get("ratio")
            return ratio
    return None


def _max_rss(results: dict[str, Any]) -> float | None:
    values = [run.get("peak_rss_mib") for run in _get(results, "growth", "runs") or []]
    values += [(_get(results, "noop", key) or {}).get("peak_rss_mib") for key in ("daemons_1", "daemons_2")]
    values = [v for v in values if isinstance(v, (int, float))]
    return max(values) if values else None


def _growth(results: dict[str, Any]) -> tuple[float | None, str]:
    runs = [r for r in _get(results, "growth", "runs") or [] if isinstance(r.get("msgs_per_s"), (int, float))]
    if len(runs) < 2:
        return None, "largest vs smallest size"
    runs.sort(key=lambda r: r["n"])
    return runs[-1]["msgs_per_s"] / runs[0]["msgs_per_s"], f"{runs[-1]['n']:,} vs {runs[0]['n']:,} contacts"


def _slowest_page(results: dict[str, Any]) -> float | None:
    """The worst median of the console's pages of a run (issue 11), when timed at a million items."""
    if (_get(results, "console", "n") or 0) < 1_000_000:
        return None
    medians = [p.get("median_ms") for p in _get(results, "console", "pages") or [] if p.get("run_page", True)]
    return max(medians) if medians and all(isinstance(m, (int, float)) for m in medians) else None


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target: name, what it needs, the measured value, and ok (True, False, or None
    when the scenario was not measured)."""
    floor = _rate(results, "floor")
    one, two = _rate(results, "noop", "daemons_1"), _rate(results, "noop", "daemons_2")
    growth, growth_what = _growth(results)
    rows = [
        ("noop, 1 daemon, × floor", ">=", 0.5, _ratio(one, floor), "×"),
        ("noop, 2 daemons, × floor", ">=", 0.7, _ratio(two, floor), "×"),
        ("noop, 1 daemon, × procrastinate", ">=", 20, _ratio(one, _rate(results, "peers", "procrastinate")), "×"),
        ("latency-bound, concurrency 64, × concurrency ÷ mean latency", ">=", 0.8, _latency(results, 64), "×"),
        ("latency-bound, concurrency 256, × concurrency ÷ mean latency", ">=", 0.8, _latency(results, 256), "×"),
        ("one-contact campaigns, messages/s, 1 daemon", ">=", 2000, _rate(results, "small", "kernel"), "/s"),
        ("one-contact campaigns, deploys/s", ">=", 2000, _get(results, "small", "kernel", "deploys_per_s"), "/s"),
        (f"growth: throughput, {growth_what}", ">=", 0.8, growth, "×"),
        ("daemon peak RSS at any size (MiB)", "<", 150, _max_rss(results), " MiB"),
        ("fair claims: another tenant's one-contact campaign, deploy → completed, slowest of 5 (ms)", "<", 1000,
         _ms(_get(results, "fair", "worst_small_s")), " ms"),
        ("fair claims: tenant A's throughput beside them, × alone", ">=", 0.9,
         _get(results, "fair", "throughput_ratio"), "×"),
        ("pick-up p99, deploy → first provider call (ms)", "<", 100,
         _get(results, "pickup", "to_first_call_p99_ms"), " ms"),
        ("console: slowest page of a run of 1,000,000 items, median (ms)", "<", 100, _slowest_page(results), " ms"),
    ]
    out = []
    for name, op, threshold, value, unit in rows:
        ok = None if value is None else (value >= threshold if op == ">=" else value < threshold)
        out.append({"target": name, "op": op, "threshold": threshold, "value": value, "unit": unit, "ok": ok})
    return out
