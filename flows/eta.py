"""The whole run's ETA, from how long each stage took the last time it produced in this store.

The flow records each produced stage's wall time in the store (`.work/stage-seconds.json`;
reused stages are not timed). While a run goes on, each unfinished stage is expected to start
when its upstream stages end (stages with no path between them run side by side) and to take
what it took last time; the ETA is when the last of them ends. A stage never timed in this
store makes the ETA unknown: a first run has none, which the flow says once.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

TIMINGS_FILE = "stage-seconds.json"
_LOCK = threading.Lock()  # stages finish in threads of one flow run


def read_timings(work_root: Path) -> dict[str, float]:
    path = work_root / TIMINGS_FILE
    try:
        return {k: float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):  # none yet, or unreadable: no estimate, never a failure
        return {}


def record_timing(work_root: Path, stage: str, seconds: float) -> None:
    """Store `stage`'s wall time (atomically: a reader never sees half a file)."""
    with _LOCK:
        timings = read_timings(work_root) | {stage: round(seconds, 1)}
        work_root.mkdir(parents=True, exist_ok=True)
        tmp = work_root / f"{TIMINGS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(timings, indent=1, sort_keys=True))
        os.replace(tmp, work_root / TIMINGS_FILE)


def eta_seconds(names: list[str], upstream: Callable[[str], list[str]], finished: dict[str, float],
                estimates: dict[str, float], started: float, now: float) -> float | None:
    """Seconds from `now` until the last of `names` (in topological order) ends, given when the run `started`,
    when the `finished` stages ended (same clock) and the `estimates` of the rest; None when one has none.
    A stage starts when its upstream stages in this run end (at `started` without any); one that should have
    ended by now is taken to end now."""
    ends: dict[str, float] = dict(finished)
    for name in names:
        if name in ends:
            continue
        if name not in estimates:
            return None
        start = max([started, *(ends[u] for u in upstream(name) if u in ends)])
        ends[name] = max(start + estimates[name], now)
    return max(ends.values(), default=now) - now
