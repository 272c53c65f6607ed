"""Engine settings: one object given to ``Sagas(app, settings)``.

Defaults come from the environment (``DATABASE_URL``, ``RECOVERY_INTERVAL``, ...) but only when a
``SagaSettings()`` is built, never at import, so an application can build its own from code.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SagaSettings(BaseSettings):
    """Everything the engine reads; field names are also the environment variable names."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    # --- the store and the broker ------------------------------------------------------------
    database_url: str = Field(
        "sqlite:///var/sagas.db", description="SQLAlchemy URL of the saga store"
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis: the result backend (failures only), and the broker unless BROKER_URL",
    )
    broker_url: str = Field(
        "", description="Celery broker (redis://..., amqp://...); empty or unset: REDIS_URL"
    )
    saga_queue: str = Field("saga", description="Queue of the coordinator's own tasks")
    sql_echo: bool = Field(False, description="Log every SQL statement (SQLAlchemy echo)")

    # --- timing and recovery -------------------------------------------------------------------
    step_timeout: float = Field(
        300.0, gt=0, description="Seconds recovery waits before re-driving a step without its "
        "own time limit (nothing kills such a step, so nothing shorter is safe)",
    )
    recovery_grace: float = Field(
        30.0, ge=0, description="Seconds past a step's hard time limit (its time_limit + 5 s, "
        "when Celery has killed it) before recovery re-drives it",
    )
    recovery_backoff_max: float = Field(
        600.0, gt=0, description="Longest wait (s) between two re-drives of a step that makes "
        "no progress: they back off exponentially from the step's own deadline up to this",
    )
    recovery_interval: float = Field(
        5.0, gt=0, description="Seconds between two beat-scheduled reconciler runs"
    )
    recovery_batch: int = Field(
        500, gt=0, description="Most sagas one reconciler run re-drives (oldest deadline first)"
    )

    sagas_max_message_bytes: int = Field(
        1024 * 1024, ge=0, description="A worker refuses (dead-letters) a task message whose "
        "body is larger, and a step result larger as JSON is not stored (bytes; 0: no limit)",
    )

    # --- observability -------------------------------------------------------------------------
    sagas_listeners: str = Field(
        "metrics", description="Comma-separated built-ins (metrics, json_log, tracing) or "
        "dotted paths module:Class of listeners every process registers",
    )
    sagas_metrics_port: int | None = Field(
        None, description="A worker's main process serves /metrics on this port (multiprocess)"
    )
    flower_url: str = Field(
        "http://127.0.0.1:5555", description="Base URL of Flower, for the dashboard's links"
    )

    # --- the outbox ----------------------------------------------------------------------------
    sagas_outbox_broker_url: str | None = Field(
        None, description="Broker the outbox relay publishes to (default: BROKER_URL)"
    )
    sagas_outbox_batch: int = Field(
        100, gt=0, description="Log rows the relay reads and publishes per batch"
    )
    sagas_outbox_interval: float = Field(
        0.5, gt=0, description="Relay poll interval when idle (s)"
    )

    @model_validator(mode="before")
    @classmethod
    def _broker_defaults_to_redis(cls, data: Any) -> Any:
        """No BROKER_URL: the broker is the Redis at REDIS_URL, as before the setting existed."""
        if isinstance(data, dict) and not data.get("broker_url"):
            data = {**data, "broker_url": data.get("redis_url") or cls.model_fields[
                "redis_url"].default}
        return data

    @property
    def outbox_broker_url(self) -> str:
        return self.sagas_outbox_broker_url or self.broker_url
