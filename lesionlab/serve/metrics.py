"""Prometheus metrics (prometheus-client), one registry per app so several apps in one process never mix."""

from __future__ import annotations

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


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, limiter: WorkLimiter, model: dict[str, str]):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lesionlab_requests", "API requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.latency = Histogram("lesionlab_request_duration_seconds", "API request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
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
        self.requests.labels(endpoint, outcome).inc()
        self.latency.labels(endpoint).observe(seconds)
        for reason in reasons or ():
            self.refusals.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
