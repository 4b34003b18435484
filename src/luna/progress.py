"""Progress lines for long work: durations, ETAs and a logging wrapper around an iterable."""

from __future__ import annotations

import datetime
import logging
import math
import time
from typing import Iterable, Iterator, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (a non-finite or negative time shows as 0:00:00)."""
    seconds = max(0, int(round(seconds))) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = max(0, int(round(seconds))) if math.isfinite(seconds) else 0
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def with_progress(iterable: Iterable[T], total: int, desc: str, every_s: float = 30.0,
                  log: logging.Logger | None = None) -> Iterator[T]:
    """Yield from ``iterable`` and log progress with rate and ETA: after items 1, 4, 16, 64 ... (as the
    book's enumerateWithEstimate) and at least every ``every_s`` seconds, plus once at the end."""
    log = log or logger
    start = last = time.perf_counter()
    next_mark = 1
    n = 0
    for n, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if n == next_mark or now - last >= every_s:
            if n == next_mark:
                next_mark *= 4
            last = now
            rate = n / max(now - start, 1e-9)
            eta = (total - n) / rate if rate > 0 else float("nan")
            done_at = datetime.datetime.now() + datetime.timedelta(seconds=eta if math.isfinite(eta) else 0)
            log.info("%s %d/%d batches, %.2f batches/s, ETA %s (done at %s)", desc, n, total, rate,
                     format_duration(eta), done_at.strftime("%H:%M:%S"))
    log.info("%s %d/%d batches done in %s", desc, n, total, format_duration(time.perf_counter() - start))
