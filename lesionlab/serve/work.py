"""Bounded work: a fixed number of inference workers, a bounded queue in front of them, a deadline per request.

The limiter is what keeps a clinic's server alive under load: at most `workers + queue` requests are admitted
(each holding at most one upload in memory); beyond that a request is answered 503 with Retry-After *before* its
body is read (TorchServe answers a full job queue with 503 the same way). Of the admitted ones, at most
`workers` decode, predict and explain at a time (each costing the per-request peak). A request still waiting
for a worker when its deadline passes, or whose deadline passes between stages, is answered 503 too.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(Exception):
    """The service is at capacity or the request ran out of time; answer 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class WorkLimiter:
    def __init__(self, workers: int, queue: int, deadline_s: float):
        if workers < 1 or queue < 0 or deadline_s <= 0:
            raise ValueError("workers >= 1, queue >= 0 and deadline > 0 are required")
        self.workers, self.queue, self.deadline_s = workers, queue, deadline_s
        self._admitted = threading.BoundedSemaphore(workers + queue)
        self._running = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self.admitted = 0
        self.running = 0
        self._mean_s = 1.0  # running mean of service time, for Retry-After

    @property
    def waiting(self) -> int:
        return max(self.admitted - self.running, 0)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, served `workers` at a time."""
        return max(1, math.ceil((self.waiting + 1) / self.workers * self._mean_s))

    def try_admit(self) -> float | None:
        """Admit a request without waiting: its deadline (monotonic seconds), or None when full."""
        if not self._admitted.acquire(blocking=False):
            return None
        with self._lock:
            self.admitted += 1
        return time.monotonic() + self.deadline_s

    def release(self) -> None:
        with self._lock:
            self.admitted -= 1
        self._admitted.release()

    def check(self, deadline: float, stage: str) -> None:
        if time.monotonic() > deadline:
            raise Busy(f"deadline of {self.deadline_s:g} s passed before {stage}; try again later", self.retry_after())

    @contextmanager
    def worker(self, deadline: float) -> Iterator[None]:
        """Hold one of the `workers` slots, waiting at most until the deadline."""
        if not self._running.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            raise Busy(f"no inference worker became free within the {self.deadline_s:g} s deadline; "
                       "try again later", self.retry_after())
        with self._lock:
            self.running += 1
        t0 = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - t0)
            self._running.release()
