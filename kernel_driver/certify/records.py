"""What a check records: its outcome, measurements and the workers it started; small statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

T = TypeVar("T")



class CheckFailed(Exception):
    """An expectation of a check was not met; the message becomes the evidence's `reason`."""


def expect(condition: object, reason: str) -> None:
    if not condition:
        raise CheckFailed(reason)


@dataclass
class CheckRecord:
    id: str
    title: str
    status: str = "FAIL"
    reason: str | None = None
    started_at: str = ""
    ended_at: str = ""
    duration_s: float = 0.0
    measurements: dict[str, Any] = field(default_factory=dict)
    workspace_ids: list[str] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    provider_message_ids: list[str] = field(default_factory=list)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def spread(values: Sequence[float]) -> dict[str, float]:
    return {name: round(percentile(values, p), 3) for name, p in (("p50", 50), ("p99", 99), ("max", 100))}
