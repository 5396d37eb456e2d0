"""Settings from the environment, prefix CLIPPRUNE_ (see README for each)."""

import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.vocabulary import Backend


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIPPRUNE_", extra="ignore")

    data_dir: Path = Path("data")
    database_url: str | None = None  # default: SQLite file in data_dir
    backend: Backend = "local"
    broker_url: str = "redis://127.0.0.1:6379/0"
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    api_keys: str = ""  # comma-separated; empty runs the service open
    max_upload_bytes: int = Field(512 * 2**20, ge=1024)
    job_timeout_s: float = Field(3600, gt=0)
    max_queued_jobs: int = Field(100, ge=1)
    job_ttl_s: float = Field(7 * 24 * 3600, gt=0)  # finished jobs and their files are deleted after
    min_free_disk_bytes: int = Field(256 * 2**20, ge=0)
    broker_prefix: str = "clipprune:"  # Redis key prefix: several deployments can share a Redis
    heartbeat_s: float = Field(5, gt=0)  # how often a running job renews its lease
    worker_lease_s: float = Field(60, gt=0)  # a job not heard from for this long is requeued
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> "Settings":
        if self.worker_lease_s < 3 * self.heartbeat_s:
            raise ValueError("CLIPPRUNE_WORKER_LEASE_S must be at least 3 x CLIPPRUNE_HEARTBEAT_S")
        return self

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'clipprune.db').resolve()}"

    @property
    def keys(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]
