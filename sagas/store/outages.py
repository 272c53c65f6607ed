"""One line per outage: a store that cannot be reached is said once, and again when it is back.

Every process notes here when a transaction failed because the database could not be reached,
and when one went through again: the first failure of an outage logs one WARNING line (no
traceback), the first success after it one INFO line, and nothing in between, however many
transitions are held or retried meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("sagas.store")

_down: dict[str, float] = {}  # store URL -> when this process first saw it down
_lock = threading.Lock()


def down(store: Any, exc: BaseException) -> None:
    key = str(getattr(store, "url", store))
    with _lock:
        if key in _down:
            return
        _down[key] = time.monotonic()
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    log.warning("saga store unavailable (%s): transitions are held and retried until it "
                "answers", detail[0] if detail else type(exc).__name__)


def up(store: Any) -> None:
    if not _down:
        return
    key = str(getattr(store, "url", store))
    with _lock:
        since = _down.pop(key, None)
    if since is not None:
        log.info("saga store reachable again after %.1fs", time.monotonic() - since)


def is_down(store: Any) -> bool:
    return str(getattr(store, "url", store)) in _down
