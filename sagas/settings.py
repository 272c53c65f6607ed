"""Engine settings, read from the environment (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SagaSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    database_url: str = Field(
        "sqlite:///var/sagas.db", description="SQLAlchemy URL of the saga store"
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Broker, result backend and coordination"
    )
    saga_queue: str = Field("saga", description="Queue of the coordinator tasks")
    step_timeout: float = Field(
        300.0, description="Expected upper bound of a step without its own time limit (s)"
    )
    recovery_grace: float = Field(
        30.0, description="Past a step's deadline, recovery re-drives it within this (s)"
    )
    sql_echo: bool = False


@lru_cache(maxsize=1)
def get_settings() -> SagaSettings:
    return SagaSettings()
