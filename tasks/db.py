"""The domain's database access and the chaos switch its participants honour."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection

from config.settings import get_app_settings
from sagas import TransientError
from sagas.store import get_engine


@contextmanager
def transaction() -> Iterator[Connection]:
    with get_engine(get_app_settings().database_url).begin() as conn:
        yield conn


def maybe_fault(where: str) -> None:
    """Chaos testing: a transient fault with probability FAULT_RATE (off by default)."""
    rate = get_app_settings().fault_rate
    if rate > 0 and random.random() < rate:
        raise TransientError(f"injected transient fault in {where}")
