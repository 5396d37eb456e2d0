"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Label values come from fixed sets, never from what a client wrote: each distinct value is a
# series kept for the process's life, so a label taken from the request line would let anyone
# grow /metrics (and the API's memory) without bound. RFC 9110's methods and PATCH (RFC 5789);
# methods are case-sensitive, so `get` is `other` too.
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER = "other"


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER


def status_label(status: object) -> str:
    text = str(status)
    return text if text.isdigit() and 100 <= int(text) <= 599 else OTHER


class RequestCounter(Counter):
    """Requests by method, route and status, with the method and status folded into their
    fixed sets however the caller passes them. The route is the matched route's template
    (`/v1/jobs/{job_id}`), never the raw path, or `unmatched`."""

    def labels(self, *values: Any, **named: Any) -> "RequestCounter":
        if named:
            named = {**named, "method": method_label(str(named.get("method", "")))}
            named["status"] = status_label(named.get("status", ""))
            return super().labels(**named)
        if len(values) == 3:
            method, route, status = values
            values = (method_label(str(method)), route, status_label(status))
        return super().labels(*values)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestCounter(
            "clipprune_http_requests_total",
            "HTTP requests by method (other outside the standard set), route template and status",
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
