"""Prometheus metrics (prometheus-client), one registry per app so several apps in one process never mix.

`RequestMetrics` is what every LesionLab web app counts through `gate.Gate` (requests by endpoint and outcome,
latency); `ServiceMetrics` (the clinician service) adds the inference queue and the model, `ReaderMetrics` (the
reader study) the reads recorded and the readers active.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from lesionlab.serve.work import WorkLimiter

# Seconds: a 600x450 image predicts in ~0.1-1 s on CPU; explanations and 48-MP uploads take seconds.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds: the reader service answers from its database (a case image, a read): milliseconds, unless it waits
# for a write lock (SQLite's busy timeout is 30 s).
DB_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0)


class RequestMetrics:
    """API requests by endpoint and outcome, and their latency, in this app's own registry.

    Args:
        namespace: prefix of the metric names (`<namespace>_requests_total`, ...).
        buckets: latency histogram buckets (seconds).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, namespace: str = "lesionlab", buckets: Sequence[float] = LATENCY_BUCKETS):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(f"{namespace}_requests", "API requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.latency = Histogram(f"{namespace}_request_duration_seconds", "API request latency by endpoint",
                                 ["endpoint"], buckets=tuple(buckets), registry=r)

    def observe(self, endpoint: str, outcome: str, seconds: float, reasons: list[str] | None = None) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ServiceMetrics(RequestMetrics):
    """The clinician service: requests, refusals by reason, the inference queue and the bundle served."""

    def __init__(self, limiter: WorkLimiter, model: dict[str, str]):
        super().__init__("lesionlab", LATENCY_BUCKETS)
        r = self.registry
        self.refusals = Counter("lesionlab_refusals", "Images refused as unevaluable, by reason", ["reason"],
                                registry=r)
        Gauge("lesionlab_queue_depth", "Admitted requests waiting for an inference worker",
              registry=r).set_function(lambda: limiter.waiting)
        Gauge("lesionlab_inference_in_progress", "Requests being decoded, predicted or explained",
              registry=r).set_function(lambda: limiter.running)
        Gauge("lesionlab_workers", "Inference workers", registry=r).set(limiter.workers)
        Gauge("lesionlab_queue_capacity", "Requests that may wait for a worker", registry=r).set(limiter.queue)
        Info("lesionlab_model", "The bundle being served", registry=r).info(model)

    def observe(self, endpoint: str, outcome: str, seconds: float, reasons: list[str] | None = None) -> None:
        super().observe(endpoint, outcome, seconds)
        for reason in reasons or ():
            self.refusals.labels(reason).inc()


class ReaderMetrics(RequestMetrics):
    """The reader-study service: requests, reads recorded (by modality) and readers active.

    A reader is active while they made an authenticated request within the last `active_window_s` seconds (by
    this process; the service runs as one process). Only counts and modality labels: never a reader's name or
    answer, so the metrics say how a study goes, not who answered what.
    """

    def __init__(self, active_window_s: float = 900.0):
        super().__init__("lesionlab_reader", DB_LATENCY_BUCKETS)
        r = self.registry
        self.window = active_window_s
        self._seen: dict[int, float] = {}  # reader id -> monotonic time of their last request
        self._lock = threading.Lock()
        self.reads = Counter("lesionlab_reader_reads", "Reads recorded (new answers; repeats not counted)",
                             ["modality"], registry=r)
        Gauge("lesionlab_reader_readers_active",
              f"Readers with a request in the last {active_window_s:g} seconds",
              registry=r).set_function(self.active)

    def seen(self, reader_id: int) -> None:
        """Note a reader's authenticated request now."""
        with self._lock:
            self._seen[reader_id] = time.monotonic()

    def active(self) -> int:
        cutoff = time.monotonic() - self.window
        with self._lock:
            for k in [k for k, t in self._seen.items() if t < cutoff]:  # forget the idle: bounded memory
                del self._seen[k]
            return len(self._seen)

    def read_recorded(self, modality: str) -> None:
        self.reads.labels(modality).inc()
