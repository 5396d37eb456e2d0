"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clipprune_http_requests_total",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.jobs = Counter(
            "clipprune_jobs_total",
            "Jobs by kind and final status",
            ["kind", "status"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "clipprune_job_duration_seconds",
            "Run time of finished jobs",
            ["kind"],
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "clipprune_queue_depth", "Jobs waiting to run", registry=self.registry
        )
        self.running = Gauge("clipprune_jobs_running", "Jobs running now", registry=self.registry)
