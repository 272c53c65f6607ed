"""Poison that needs no broker: a result JSON cannot hold, an input over the size limit, and the
consumer's helpers. The same cases on real workers: ``tests/integration/test_poison.py``."""

from __future__ import annotations

from typing import Any

import pytest

from sagas import RetryPolicy, Saga, SagaSettings, SagaState, Step, StepContext, StepState
from sagas.errors import InvalidSagaInputError
from sagas.runtime.consumer import _jsonable, _saga_of
from sagas.runtime.poison import PoisonReason, check_input_size
from sagas.store import dead_letters
from sagas.testing import SagaRunner

ONCE = RetryPolicy(attempts=1, jitter=False)


def _step(name: str, *, undo: bool = True, **kw: Any) -> Step:
    return Step(name, f"svc.{name}", f"svc.undo_{name}" if undo else None, retry=ONCE,
                compensation_retry=ONCE, **kw)


SAGA = Saga("k_poison", [_step("a"), _step("b"), _step("pivot", undo=False, pivot=True),
                         _step("after", undo=False)])


def participants(bad: str) -> dict[str, Any]:
    def act(ctx: dict[str, Any]) -> dict[str, Any]:
        step = StepContext.model_validate(ctx)
        if step.step == bad:
            return {"when": {1, 2}}  # a set: JSON cannot hold it
        return {"step": step.step}

    def undo(ctx: dict[str, Any]) -> dict[str, Any]:
        return {"undone": StepContext.model_validate(ctx).step}

    out: dict[str, Any] = {}
    for name in ("a", "b", "pivot", "after"):
        out[f"svc.{name}"], out[f"svc.undo_{name}"] = act, undo
    return out


def test_a_result_json_cannot_hold_before_the_pivot_is_undone_with_the_saga():
    with SagaRunner(SAGA, participants=participants("b")) as runner:
        result = runner.run(SAGA, {})
        letters, total = dead_letters.list_dead(runner.engine.store)
    assert result.state is SagaState.COMPENSATED
    assert result.steps["b"].state is StepState.COMPENSATED, "its effect may have happened"
    assert "UnserializableResult" in (result.steps["b"].error or "")
    assert result.steps["a"].state is StepState.COMPENSATED
    assert total == 1 and letters[0]["reason"] == PoisonReason.UNSERIALIZABLE_RESULT
    assert letters[0]["step"] == "b" and letters[0]["saga_id"] == result.id


@pytest.mark.parametrize("bad", ["pivot", "after"])
def test_from_the_pivot_on_the_step_is_kept_with_a_stand_in_and_the_saga_goes_forward(bad: str):
    with SagaRunner(SAGA, participants=participants(bad)) as runner:
        result = runner.run(SAGA, {})
        _, total = dead_letters.list_dead(runner.engine.store)
    assert result.state is SagaState.COMPLETED
    assert result.steps[bad].state is StepState.SUCCEEDED
    assert result.steps[bad].result == {"unserializable_result": "dict: {'when': {1, 2}}"}
    assert total == 1


def test_an_input_over_the_message_limit_is_refused_before_anything_is_recorded():
    settings = SagaSettings(sagas_max_message_bytes=1000)
    check_input_size(settings, {"x": "y" * 900})
    with pytest.raises(InvalidSagaInputError, match="over SAGAS_MAX_MESSAGE_BYTES"):
        check_input_size(settings, {"x": "y" * 1000})
    check_input_size(SagaSettings(sagas_max_message_bytes=0), {"x": "y" * 10**6})


def test_the_consumer_keeps_headers_any_store_takes_and_finds_the_saga_in_a_step_id():
    assert _jsonable({"task": "a\x00b", "n": 1}) == {"task": "a\\x00b", "n": 1}
    assert set(_jsonable({"nan": float("nan")})) == {"repr"}
    assert _saga_of({"id": "9b2e-1.charge.do.2"}) == "9b2e-1"
    assert _saga_of({"id": "plain-celery-id"}) is None
    assert _saga_of({"id": "a.b.c.d"}) is None
