"""Application settings: the engine's, plus what the order domain and the web app need."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field

from sagas.settings import SagaSettings


class Settings(SagaSettings):
    starting_stock: dict[str, int] = Field(
        default_factory=lambda: {"laptop": 1000, "phone": 1000, "book": 1000},
        description="Stock a fresh database starts with (JSON object sku -> units)",
    )
    payment_limit: float = Field(500.0, description="Charges above this are declined")
    admin_token: str | None = Field(None, description="Bearer token for retry/cancel")
    fault_rate: float = Field(
        0.0, description="Chaos: probability that a participant raises a transient fault"
    )
    service_latency: float = Field(
        0.0, ge=0, description="Chaos: seconds each participant call waits before its work, as "
        "a remote service's round trip would (a fault then finds steps in the middle of a run)",
    )
    order_locks: str = Field(
        "customer,sku", description="Semantic locks an order saga holds, comma-separated: "
        "customer (one order per customer at a time), sku (one per item); empty for none",
    )
    order_lock_policy: str = Field(
        "wait", description="An order whose lock is held: wait (queued, runs when it frees) "
        "or reject (refused at once, 409 from the web app)",
    )
    order_step_time_limit: float = Field(
        30.0, gt=0, description="Time limit of each order saga step (s): past it the step is "
        "stopped, and recovery re-drives a step not heard from (tests shorten it)",
    )
    worker_max_memory_per_child: int = Field(
        200_000, ge=0, description="Celery replaces a pool process past this RSS (KiB; 0: "
        "never). A failing task costs billiard's ExceptionInfo a list of every code position "
        "of every frame (billiard/einfo.py, Python 3.11+), and a long-lived pool process keeps "
        "that memory: about 46 MB per 1000 declined orders (docs/reliability.md)",
    )
    port: int = Field(8000, description="Port of the web app")
    protect_reads: bool = Field(
        False, description="Web app: GET endpoints also require the admin Bearer token"
    )
    max_body_bytes: int = Field(
        64 * 1024, description="Web app: larger request bodies are refused with 413"
    )
    sagas_imports: str = Field(
        "", description="Comma-separated extra modules every worker imports (more sagas)"
    )


@lru_cache(maxsize=1)
def get_app_settings() -> Settings:
    return Settings()
