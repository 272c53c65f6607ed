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


def down(what: Any, exc: BaseException, consequence: str | None = None) -> None:
    """``what`` (a store, or a name) cannot be reached: say so once per outage."""
    key = _key(what)
    with _lock:
        if key in _down:
            return
        _down[key] = time.monotonic()
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    reason = detail[0] if detail else type(exc).__name__
    if consequence is None:
        log.warning("saga store unavailable (%s): transitions are held and retried until it "
                    "answers", reason)
    else:
        log.warning("%s (%s)", consequence, reason)


def up(what: Any) -> None:
    """``what`` answered: say so once, if it was down."""
    if not _down:
        return
    key = _key(what)
    with _lock:
        since = _down.pop(key, None)
    if since is not None:
        name = "saga store" if hasattr(what, "url") else str(what).split(" ", 1)[0]
        log.info("%s reachable again after %.1fs", name, time.monotonic() - since)


def is_down(what: Any) -> bool:
    return _key(what) in _down


def _key(what: Any) -> str:
    return str(getattr(what, "url", what))
