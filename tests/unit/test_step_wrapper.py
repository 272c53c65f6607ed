"""The engine runs a plain task as a saga step without ``task_cls``, keeping what it set."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, Task

from sagas import BusinessError, DefinitionError, Saga, Sagas, SagaSettings, Step
from sagas.runtime.dispatch import INLINE_MARK
from sagas.runtime.worker import wrap_step_task


def _engine(name: str) -> tuple[Celery, Sagas]:
    app = Celery(name, broker="memory://")
    return app, Sagas(app, SagaSettings(database_url="sqlite:///:memory:", sagas_listeners=""))


def test_registering_a_saga_wraps_its_tasks_and_keeps_their_own_options():
    app, engine = _engine("wrap-keep")

    @app.task(name="svc.act", max_retries=9, default_retry_delay=7)
    def act(ctx: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    @app.task(name="svc.undo")
    def undo(ctx: dict[str, Any]) -> None:
        return None

    engine.register(Saga("s", [Step("a", action=act, compensation=undo)]))
    task = app.tasks["svc.act"]
    assert getattr(task, INLINE_MARK, False)
    assert task.max_retries == 9 and task.default_retry_delay == 7, "the task's own options"
    assert BusinessError in task.throws, "business refusals are expected, logged without trace"
    assert getattr(app.tasks["svc.undo"], INLINE_MARK, False)
    assert app.tasks["svc.undo"].default_retry_delay == 1, "a lost worker's task comes back fast"
    assert act.run({"x": 1}) == {"ok": True}, "the task's own function is untouched"


def test_a_plain_call_of_a_wrapped_task_is_a_plain_call():
    app, engine = _engine("wrap-plain")

    @app.task(name="svc.add")
    def add(x: int, y: int) -> int:
        return x + y

    engine.register(Saga("s", [Step("a", action=add)]))
    assert app.tasks["svc.add"](2, 3) == 5


def test_wrapping_twice_changes_nothing():
    app, engine = _engine("wrap-twice")

    @app.task(name="svc.once")
    def once(ctx: dict[str, Any]) -> None:
        return None

    saga = Saga("s", [Step("a", action=once)])
    engine.register(saga)
    first = type(app.tasks["svc.once"])
    engine.register(saga)
    assert type(app.tasks["svc.once"]) is first


def test_a_task_that_cannot_be_wrapped_is_refused_naming_the_step():
    with pytest.raises(DefinitionError, match=r"step .pay.*svc\.slotted"):
        wrap_step_task(_Frozen(), "pay")


class _Frozen(Task):  # type: ignore[misc]
    """A task whose instance cannot take another class (``__class__`` assignment refused)."""

    name = "svc.slotted"

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "__class__":
            raise TypeError("__class__ assignment refused")
        super().__setattr__(name, value)


def test_two_engines_register_sagas_of_the_same_name_apart():
    app_a, engine_a = _engine("twin-a")
    app_b, engine_b = _engine("twin-b")
    saga_a = engine_a.register(Saga("trip", [Step("a", action="svc.a")]))
    saga_b = engine_b.register(Saga("trip", [Step("b", action="svc.b")]))
    assert engine_a.saga("trip") is saga_a and engine_b.saga("trip") is saga_b
    assert Sagas.of(app_a) is engine_a and Sagas.of(app_b) is engine_b
    with pytest.raises(DefinitionError, match="already has a saga engine"):
        Sagas(app_a)
    with pytest.raises(DefinitionError, match="a different saga named 'trip'"):
        engine_a.register(Saga("trip", [Step("c", action="svc.c")]))


def test_a_second_engine_adds_its_listeners_and_keeps_the_firsts():
    from sagas.observe import listeners

    saved = (dict(listeners._builders), listeners._active)
    try:
        app_a, app_b = Celery("listen-a", broker="memory://"), Celery("listen-b", broker="memory://")
        Sagas(app_a, SagaSettings(database_url="sqlite:///:memory:", sagas_listeners="json_log"))
        Sagas(app_b, SagaSettings(database_url="sqlite:///:memory:", sagas_listeners=""))
        kinds = [type(x).__name__ for x in listeners.configure()]
        assert "JsonLogListener" in kinds, "the second engine did not drop the first's listeners"
    finally:
        listeners._builders.clear()
        listeners._builders.update(saved[0])
        listeners._active = saved[1]
