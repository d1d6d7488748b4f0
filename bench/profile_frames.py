"""py-spy's raw (collapsed) stacks → the daemon's top frames (pure)."""

from __future__ import annotations

from collections import Counter
from typing import Any

TOP = 12


def top_frames(raw: str, top: int = TOP) -> dict[str, Any]:
    """py-spy's raw (collapsed) output → the leaf frames with most samples, and inclusive counts."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f.split(" (")[0] + (" (" + f.split(" (")[1].split(":")[0] + ")" if " (" in f else "")
                  for f in stack.split(";")[1:]]
        if not frames:
            continue
        n = int(count)
        total += n
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    return {"samples": total,
            "self": [{"frame": f, "share": c / total} for f, c in leaf.most_common(top)] if total else [],
            "inclusive": [{"frame": f, "share": c / total} for f, c in inclusive.most_common(top)] if total else []}
