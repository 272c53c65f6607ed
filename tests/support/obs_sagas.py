"""Sagas for the observability tests, on queues the shared test worker does not serve.

Their steps reuse the test domain's ``testsvc.act``/``testsvc.undo`` (planned through the saga
input); a test starts its own worker (in-process or a subprocess) for these queues.
"""

from __future__ import annotations

from config import engine
from sagas import Saga, Step
from tests.support.test_sagas import FAST, FAST_UNDO, act, undo

TRACE_QUEUE = "obs_trace"
XPROC_QUEUE = "obs_xproc"


def _step(name: str, queue: str) -> Step:
    return Step(name, action=act, compensation=undo, queue=queue, retry=FAST,
                compensation_retry=FAST_UNDO)


traced = Saga("t_traced", steps=[_step(n, TRACE_QUEUE) for n in ("a", "b", "c")])
cross_process = Saga("t_xproc", steps=[_step(n, XPROC_QUEUE) for n in ("a", "b")])

for _saga in (traced, cross_process):
    engine.register(_saga)
