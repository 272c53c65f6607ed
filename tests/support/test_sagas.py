"""A second domain, defined only in the tests, run through the same engine as orders.

Every step runs ``testsvc.act`` and compensates with ``testsvc.undo``; what each call does is
planned in the saga input under ``plan.<step>``: ``fail`` (a business failure), ``fail_while``
(a business failure while that Redis key exists: a test "fixes the cause" by deleting it),
``transient``
(fail that many calls, then succeed), ``sleep`` seconds, ``undo_fail`` (the compensation always
fails), ``unserializable`` (the action succeeds but returns a set, which JSON cannot hold).
Each call is counted and logged in Redis so tests can assert effects and their order.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from config import app, engine
from sagas import BusinessError, RetryPolicy, Saga, Step, TransientError

QUEUE = "testsvc"
FAST = RetryPolicy(attempts=3, backoff=0.05, backoff_max=0.2)
FAST_UNDO = RetryPolicy(attempts=3, backoff=0.05, backoff_max=0.2)

_redis: redis.Redis | None = None


def ledger() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    return _redis


def _record(ctx: dict[str, Any]) -> tuple[dict[str, Any], int]:
    plan = ctx["input"].get("plan", {}).get(ctx["step"], {})
    key = f"calls:{ctx['saga_id']}:{ctx['step']}:{ctx['phase']}"
    calls = int(ledger().incr(key))
    ledger().rpush(f"log:{ctx['saga_id']}", f"{ctx['phase']}:{ctx['step']}")
    return plan, calls


@app.task(name="testsvc.act", queue=QUEUE)
def act(ctx: dict[str, Any]) -> dict[str, Any]:
    plan, calls = _record(ctx)
    started = time.time()
    if plan.get("sleep"):
        time.sleep(float(plan["sleep"]))
    if plan.get("fail") or (plan.get("fail_while") and ledger().exists(plan["fail_while"])):
        raise BusinessError(f"planned failure of {ctx['step']}")
    if calls <= int(plan.get("transient", 0)):
        raise TransientError(f"planned transient failure {calls} of {ctx['step']}")
    if plan.get("unserializable"):
        return {"step": ctx["step"], "ids": {1, 2}}
    return {"step": ctx["step"], "calls": calls, "started": started, "ended": time.time(),
            "seen": sorted(ctx["results"])}


@app.task(name="testsvc.undo", queue=QUEUE)
def undo(ctx: dict[str, Any]) -> dict[str, Any]:
    plan, calls = _record(ctx)
    if plan.get("undo_fail"):
        raise RuntimeError(f"planned compensation failure of {ctx['step']}")
    return {"undone": ctx["step"], "calls": calls}


def _step(name: str, **kw: Any) -> Step:
    kw.setdefault("compensation", undo)
    return Step(name, action=act, queue=QUEUE, retry=FAST, compensation_retry=FAST_UNDO, **kw)


linear = Saga("t_linear", steps=[_step(n) for n in ("a", "b", "c", "d")])

no_undo = Saga(
    "t_no_undo", steps=[_step("a"), _step("b", compensation=None), _step("c")]
)

diamond = Saga(
    "t_diamond",
    steps=[
        _step("a"),
        _step("b", depends_on=["a"]),
        _step("c", depends_on=["a"]),
        _step("d", depends_on=["b", "c"]),
    ],
)

pivoted = Saga(
    "t_pivot",
    steps=[
        _step("a"),
        _step("p", pivot=True, compensation=None),
        Step("z", action=act, queue=QUEUE, retry=RetryPolicy(attempts=2, backoff=0.05,
                                                              backoff_max=0.1)),
    ],
)

timed = Saga("t_timed", steps=[_step("a"), _step("slow", time_limit=1.0)])

foreign = Saga(
    "t_foreign", steps=[_step("a"), Step("elsewhere", action="nowhere.registered", queue=QUEUE)]
)



def _keys(data: dict[str, Any]) -> list[str]:
    """Semantic locks named in the input: ``{"keys": ["account:1", ...]}``."""
    return list(data.get("keys", []))


# Two steps under semantic locks (``keys`` in the input): queued behind a holder, or refused.
locked = Saga("t_locked", steps=[_step("a"), _step("b")], locks=_keys, on_locked="wait")
locked_reject = Saga("t_locked_reject", steps=[_step("a"), _step("b")], locks=_keys,
                     on_locked="reject")

for _saga in (linear, no_undo, diamond, pivoted, timed, foreign, locked, locked_reject):
    engine.register(_saga)
