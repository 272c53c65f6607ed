"""The step context: the single argument every step and compensation task receives."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StepContext(BaseModel):
    """What a participant needs: its idempotency key, the saga input, earlier steps' results."""

    model_config = ConfigDict(extra="allow", frozen=True)

    saga_id: str
    saga: str
    step: str
    phase: Literal["action", "compensation"]
    idempotency_key: str
    attempt: int = 1
    after_pivot: bool = False
    inline: bool = False
    input: dict[str, Any] = Field(default_factory=dict)
    results: dict[str, Any] = Field(default_factory=dict)
