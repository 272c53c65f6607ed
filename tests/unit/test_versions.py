"""Versioned definitions: an instance is decided with the version it started on, or not at all."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from sagas import IgnoreKind, Saga, Sagas, SagaSettings, SagaState, Step, StepState
from sagas.coordinator import StepSucceeded
from sagas.errors import UnknownSagaVersionError
from sagas.observe import metrics
from sagas.runtime.transitions import apply_event


def _engine(name: str, url: str, *sagas: Saga) -> Sagas:
    app = Celery(name, broker="memory://")
    engine = Sagas(app, SagaSettings(database_url=url, sagas_listeners=""), sagas=sagas)
    engine._binding.publisher = lambda *_: None  # decided dispatches are not sent anywhere
    return engine


def _v(version: int, *steps: str, queue: str = "q") -> Saga:
    return Saga("vsaga", [Step(s, action=f"v.{s}", compensation=f"v.undo_{s}", queue=queue)
                          for s in steps], version=version)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/v.db"


def _succeed(engine: Sagas, saga_id: str, step: str) -> Any:
    return apply_event(engine._binding, saga_id, StepSucceeded(step, "action", {"ok": step}))


def test_a_start_uses_the_newest_version_unless_one_is_named(url: str):
    engine = _engine("v-newest", url, _v(1, "a", "b", "c"), _v(2, "a", "b2", "c"))
    engine.upgrade_schema()
    newest = engine.start("vsaga", {}).outcome()
    pinned = engine.start("vsaga", {}, version=1).outcome()
    assert list(newest.steps) == ["a", "b2", "c"] and list(pinned.steps) == ["a", "b", "c"]
    view = engine.store.get_view(pinned.id)
    assert (view["version"], view["fingerprint"]) == (1, engine.saga("vsaga", 1).fingerprint)
    with pytest.raises(UnknownSagaVersionError, match=r"no version 7.*registered: v1, v2"):
        engine.start("vsaga", {}, version=7)


def test_every_later_event_is_decided_with_the_instances_own_version(url: str):
    engine = _engine("v-own", url, _v(1, "a", "b", "c"), _v(2, "a", "b2", "c"))
    engine.upgrade_schema()
    old = engine.start("vsaga", {}, version=1)
    _succeed(engine, old.id, "a")
    outcome = old.outcome()
    assert outcome.steps["b"].state is StepState.RUNNING, "v1's second step, not v2's b2"
    _succeed(engine, old.id, "b")
    _succeed(engine, old.id, "c")
    assert old.outcome().state is SagaState.COMPLETED


def test_a_worker_without_the_version_refuses_the_event_and_changes_nothing(
    url: str, caplog: pytest.LogCaptureFixture
):
    deployed = _engine("v-old", url, _v(1, "a", "b", "c"))
    deployed.upgrade_schema()
    saga = deployed.start("vsaga", {})
    before = deployed.store.get_view(saga.id)
    redeployed = _engine("v-new", url, _v(2, "a", "b2", "c"))
    from sagas.observe import listeners

    added = not any(isinstance(x, metrics.MetricsListener) for x in listeners.active())
    listeners.ensure(metrics.MetricsListener)
    labels = {"saga": "vsaga", "version": "1", "reason": "unknown_version"}
    refused_before = metrics.sample("sagas_events_refused_total", labels)
    try:
        with caplog.at_level(logging.WARNING, logger="sagas"):
            decision = _succeed(redeployed, saga.id, "a")
    finally:
        if added:
            listeners.discard(metrics.MetricsListener)
    assert decision.ignored is not None and decision.ignored.kind is IgnoreKind.UNKNOWN_VERSION
    assert not decision.dispatches and not decision.transitions
    after = deployed.store.get_view(saga.id)
    assert after["steps"] == before["steps"] and after["events"] == before["events"]
    assert metrics.sample("sagas_events_refused_total", labels) == refused_before + 1
    lines = [r.getMessage() for r in caplog.records if "no version 1" in r.getMessage()]
    assert len(lines) == 1 and saga.id in lines[0], "one clear log line naming the saga"
    # A worker that has v1 decides it as if nothing happened.
    assert _succeed(deployed, saga.id, "a").ignored is None
    assert deployed.handle(saga.id).outcome().steps["b"].state is StepState.RUNNING


def test_a_graph_changed_under_the_same_version_is_refused_or_reported(
    url: str, caplog: pytest.LogCaptureFixture
):
    deployed = _engine("g-old", url, _v(1, "a", "b", "c"))
    deployed.upgrade_schema()
    saga = deployed.start("vsaga", {})
    renamed = _engine("g-renamed", url, _v(1, "a", "b2", "c"))
    decision = _succeed(renamed, saga.id, "a")
    assert decision.ignored is not None and decision.ignored.kind is IgnoreKind.GRAPH_CHANGED
    assert "register the old graph as its own version" in decision.ignored.detail
    [changed] = renamed.changed_graphs()
    assert (changed.name, changed.version, changed.in_flight) == ("vsaga", 1, 1)
    moved = _engine("g-moved", url, _v(1, "a", "b", "c", queue="elsewhere"))
    with caplog.at_level(logging.ERROR, logger="sagas"):
        assert _succeed(moved, saga.id, "a").ignored is None, "same steps: decided"
        _succeed(moved, saga.id, "b")
    reports = [r for r in caplog.records if "changed its graph without a new version" in
               r.getMessage()]
    assert len(reports) == 1, "reported loudly, once per process"


def test_versions_lists_each_version_in_use_with_its_in_flight_count(url: str):
    engine = _engine("v-list", url, _v(1, "a"), _v(2, "a", "b"))
    engine.upgrade_schema()
    done = engine.start("vsaga", {}, version=1)
    _succeed(engine, done.id, "a")
    engine.start("vsaga", {}, version=1)
    engine.start("vsaga", {})
    rows = {(v.name, v.version): (v.in_flight, v.total, v.registered) for v in engine.versions()}
    assert rows == {("vsaga", 1): (1, 2, True), ("vsaga", 2): (1, 1, True)}
    listed, total = engine.store.list_sagas(version=1)
    assert total == 2 and {r["version"] for r in listed} == {1}
