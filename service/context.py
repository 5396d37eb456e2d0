"""What the routes share: built once by the app's lifespan, reached through request.app.state."""

from dataclasses import dataclass

from fastapi import Request

from service.artifacts import ArtifactStore
from service.local_backend import LocalBackend
from service.metrics import Metrics
from service.settings import Settings
from service.store import JobStore


@dataclass
class ServiceContext:
    settings: Settings
    store: JobStore
    artifacts: ArtifactStore
    backend: LocalBackend
    metrics: Metrics


def context(request: Request) -> ServiceContext:
    return request.app.state.context
