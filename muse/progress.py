"""Progress of long work, for whoever runs a stage: the Prefect UI when the flow runs it, nobody otherwise.

Stages never import Prefect. The runner installs a reporter for the stage it runs
(`reporting(reporter)`, a context variable, so concurrent stages in threads each keep their
own); the training loop calls `report` as it logs. Work in other processes (Ray workers
other than the driver) has no reporter and reports nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol


class Reporter(Protocol):
    def __call__(self, name: str, done: int, total: int, eta_seconds: float | None) -> None:
        """`name` (e.g. `base`) has done `done` of `total` units; None: no ETA yet."""


_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("muse_progress", default=None)


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Send this context's `report` calls to `reporter`."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)


def report(name: str, done: int, total: int, eta_seconds: float | None = None) -> None:
    """Tell the current reporter, if there is one; a reporter's failure never stops the work."""
    reporter = _REPORTER.get()
    if reporter is None:
        return
    try:
        reporter(name, done, total, eta_seconds)
    except Exception:  # noqa: BLE001 - progress is for watching; the training must go on without it
        import logging

        logging.getLogger("muse.progress").debug("progress report failed", exc_info=True)
