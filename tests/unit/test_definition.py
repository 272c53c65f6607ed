"""How a saga is declared: graph validation, ordering, input, rendering and retry policy."""

from __future__ import annotations

import random

import pytest
from pydantic import BaseModel

from sagas.definition import DEFAULT_QUEUE, RetryPolicy, Saga, Step, task_name
from sagas.errors import (
    BusinessError,
    CompensationAfterPivotError,
    CycleError,
    DefinitionError,
    DuplicateStepError,
    InvalidSagaInputError,
    TransientError,
    UnknownDependencyError,
)


class FakeTask:
    """Stands in for a Celery task: only ``name`` (and optionally ``queue``) are read."""

    def __init__(self, name: str, queue: str | None = None) -> None:
        self.name = name
        if queue is not None:
            self.queue = queue


def make_saga(*steps: Step, name: str = "unit", **kwargs) -> Saga:
    return Saga(name, list(steps), **kwargs)


def step(name: str, *, comp: bool = True, **kwargs) -> Step:
    return Step(name, f"svc.{name}", f"svc.undo_{name}" if comp else None, **kwargs)


# --- definition errors --------------------------------------------------------------------
def test_duplicate_step_name_is_rejected_naming_the_step():
    with pytest.raises(DuplicateStepError, match=r"duplicate step name 'pay'"):
        make_saga(step("reserve"), step("pay"), step("pay"))


def test_dependency_on_an_unknown_step_is_rejected_naming_both_steps():
    with pytest.raises(UnknownDependencyError, match=r"step 'ship' depends on unknown step 'pak'"):
        make_saga(step("pay"), step("ship", depends_on=["pak"]))


def test_cycle_is_rejected_naming_the_steps_in_it():
    with pytest.raises(CycleError, match=r"cycle through steps") as info:
        make_saga(step("a", depends_on=["c"]), step("b"), step("c"), step("root", depends_on=[]))
    message = str(info.value)
    for name in ("'a'", "'b'", "'c'"):
        assert name in message
    assert "'root'" not in message


def test_step_depending_on_itself_is_a_cycle():
    with pytest.raises(CycleError, match=r"'a'"):
        make_saga(step("a", depends_on=["a"]))


def test_step_after_the_pivot_that_declares_a_compensation_is_rejected_naming_it():
    expected = r"step 'ship' comes after the pivot 'pay'"
    with pytest.raises(CompensationAfterPivotError, match=expected):
        make_saga(step("reserve"), step("pay", pivot=True), step("ship"))


def test_step_after_the_pivot_without_compensation_is_accepted():
    saga = make_saga(step("reserve"), step("pay", pivot=True), step("ship", comp=False))
    assert saga.pivot == "pay"


def test_pivot_itself_may_declare_a_compensation():
    saga = make_saga(step("reserve"), step("pay", pivot=True))
    assert saga.steps["pay"].compensation_name == "svc.undo_pay"


def test_more_than_one_pivot_is_rejected_naming_the_pivots():
    with pytest.raises(DefinitionError, match=r"more than one pivot step: \['a', 'b'\]"):
        make_saga(step("a", pivot=True), step("b", pivot=True, depends_on=[]))


def test_saga_without_steps_is_rejected_naming_the_saga():
    with pytest.raises(DefinitionError, match=r"saga 'empty' has no steps"):
        make_saga(name="empty")


def test_saga_without_a_name_is_rejected():
    with pytest.raises(DefinitionError, match="needs a name"):
        make_saga(step("a"), name="")


def test_step_without_a_name_is_rejected():
    with pytest.raises(DefinitionError, match="every step needs a name"):
        make_saga(step(""))


def test_action_that_is_neither_a_task_nor_a_name_is_rejected_at_definition_time():
    with pytest.raises(DefinitionError, match="neither a Celery task nor a task name"):
        make_saga(Step("a", action=42))


def test_compensation_that_is_neither_a_task_nor_a_name_is_rejected_at_definition_time():
    with pytest.raises(DefinitionError, match="neither a Celery task nor a task name"):
        make_saga(Step("a", action="svc.a", compensation=object()))


def test_every_definition_error_is_a_saga_error():
    from sagas.errors import SagaError

    for exc in (DuplicateStepError, UnknownDependencyError, CycleError,
                CompensationAfterPivotError):
        assert issubclass(exc, DefinitionError)
        assert issubclass(exc, SagaError)


# --- dependencies and graph -----------------------------------------------------------------
def test_step_depends_by_default_on_the_step_declared_before_it():
    saga = make_saga(step("a"), step("b"), step("c"))
    assert saga.parents == {"a": (), "b": ("a",), "c": ("b",)}
    assert saga.children == {"a": ("b",), "b": ("c",), "c": ()}
    assert saga.roots == ("a",)


def test_empty_depends_on_makes_a_step_a_root():
    saga = make_saga(step("a"), step("b", depends_on=[]), step("c"))
    assert saga.parents["b"] == ()
    assert saga.parents["c"] == ("b",)
    assert saga.roots == ("a", "b")


def test_depends_on_accepts_a_single_step_name_as_a_string():
    saga = make_saga(step("a"), step("b", depends_on=[]), step("c", depends_on="a"))
    assert saga.parents["c"] == ("a",)


def test_step_with_several_dependencies_is_a_join():
    saga = make_saga(
        step("a"), step("b"), step("c", depends_on=["a"]), step("d", depends_on=["b", "c"])
    )
    assert saga.parents["d"] == ("b", "c")
    assert saga.children["a"] == ("b", "c")
    assert set(saga.children["b"]) == {"d"} and set(saga.children["c"]) == {"d"}


def test_a_dependency_named_twice_counts_once_and_is_not_mistaken_for_a_cycle():
    saga = make_saga(step("a"), step("b", depends_on=["a", "a"]))
    assert saga.parents["b"] == ("a",)
    assert saga.order == ("a", "b")


def test_order_is_topological_even_when_steps_are_declared_before_their_dependencies():
    saga = make_saga(
        step("ship", depends_on=["pay", "pack"]),
        step("pay", depends_on=["reserve"]),
        step("pack", depends_on=["reserve"]),
        step("reserve", depends_on=[]),
    )
    position = {name: i for i, name in enumerate(saga.order)}
    assert set(saga.order) == {"ship", "pay", "pack", "reserve"}
    for name, parents in saga.parents.items():
        for parent in parents:
            assert position[parent] < position[name]
    assert saga.order[0] == "reserve" and saga.order[-1] == "ship"


def test_descendants_are_every_step_reachable_downstream():
    saga = make_saga(
        step("a"), step("b"), step("c", depends_on=["a"]), step("d", depends_on=["b", "c"]),
        step("e", depends_on=["d"]), step("lone", depends_on=[]),
    )
    assert saga.descendants("a") == {"b", "c", "d", "e"}
    assert saga.descendants("b") == {"d", "e"}
    assert saga.descendants("e") == set()
    assert saga.descendants("lone") == set()


def test_after_pivot_holds_only_the_pivots_descendants():
    saga = make_saga(
        step("a"),
        step("pay", pivot=True),
        step("ship", comp=False),
        step("notify", comp=False, depends_on=["ship"]),
        step("side", depends_on=["a"]),
    )
    assert saga.after_pivot == frozenset({"ship", "notify"})
    assert "pay" not in saga.after_pivot


def test_saga_without_pivot_has_nothing_after_the_pivot():
    saga = make_saga(step("a"), step("b"))
    assert saga.pivot is None
    assert saga.after_pivot == frozenset()


# --- task names --------------------------------------------------------------------------
def test_task_names_are_accepted_as_strings_or_objects_with_a_name():
    saga = make_saga(
        Step("a", action="svc.a", compensation=FakeTask("svc.undo_a")),
        Step("b", action=FakeTask("svc.b")),
    )
    assert saga.steps["a"].action_name == "svc.a"
    assert saga.steps["a"].compensation_name == "svc.undo_a"
    assert saga.steps["b"].action_name == "svc.b"
    assert saga.steps["b"].compensation_name is None
    assert saga.task_names() == {"svc.a", "svc.undo_a", "svc.b"}


def test_task_name_refuses_an_object_whose_name_is_not_a_string():
    with pytest.raises(DefinitionError):
        task_name(FakeTask.__new__(FakeTask))


def test_unknown_tasks_lists_every_task_no_worker_knows_sorted():
    saga = make_saga(step("b"), step("a"))
    assert saga.unknown_tasks({"svc.a", "svc.undo_b"}) == ["svc.b", "svc.undo_a"]
    assert saga.unknown_tasks(saga.task_names()) == []


def test_step_queue_comes_from_the_step_then_the_task_then_the_default():
    assert Step("a", FakeTask("svc.a", queue="tq"), queue="sq").target_queue == "sq"
    assert Step("a", FakeTask("svc.a", queue="tq")).target_queue == "tq"
    assert Step("a", "svc.a").target_queue == DEFAULT_QUEUE


# --- input -------------------------------------------------------------------------------
class OrderInput(BaseModel):
    order_id: int
    amount: float


def test_input_without_a_model_must_be_a_json_object():
    saga = make_saga(step("a"))
    data = {"x": 1}
    validated = saga.validate_input(data)
    assert validated == {"x": 1}
    assert validated is not data
    with pytest.raises(InvalidSagaInputError, match="input must be a JSON object, got list"):
        saga.validate_input([1, 2])


def test_input_with_a_model_is_validated_and_coerced_to_json():
    saga = make_saga(step("a"), input_model=OrderInput)
    assert saga.validate_input({"order_id": "7", "amount": 9}) == {"order_id": 7, "amount": 9.0}


def test_input_may_be_given_as_a_model_instance():
    saga = make_saga(step("a"), input_model=OrderInput)
    assert saga.validate_input(OrderInput(order_id=1, amount=2.5)) == {
        "order_id": 1, "amount": 2.5,
    }


def test_invalid_input_error_names_the_saga_and_every_bad_field():
    saga = make_saga(step("a"), input_model=OrderInput, name="orders")
    with pytest.raises(InvalidSagaInputError) as info:
        saga.validate_input({"order_id": "not-a-number"})
    message = str(info.value)
    assert "saga 'orders'" in message
    assert "order_id" in message
    assert "amount" in message


def test_non_object_input_to_a_model_is_an_invalid_input_error():
    saga = make_saga(step("a"), input_model=OrderInput)
    with pytest.raises(InvalidSagaInputError, match="invalid input"):
        saga.validate_input("nope")


# --- rendering ---------------------------------------------------------------------------
def diamond_with_pivot() -> Saga:
    return make_saga(
        step("reserve"),
        step("pay", depends_on=["reserve"]),
        step("pack", depends_on=["reserve"]),
        step("ship", comp=False, pivot=True, depends_on=["pay", "pack"]),
        name="diamond",
    )


def test_render_text_lists_every_step_with_its_task_compensation_and_parents():
    saga = diamond_with_pivot()
    text = saga.render_text()
    assert text.splitlines()[0] == f"saga diamond v1 ({saga.fingerprint})"
    for name in saga.order:
        assert f"  {name}" in text
        assert saga.steps[name].action_name in text
    assert "reserve: svc.reserve on saga; compensation svc.undo_reserve; after (start)" in text
    assert "ship [pivot]: svc.ship on saga; compensation -; after pay, pack" in text


def test_render_mermaid_has_a_node_for_every_step_and_an_edge_for_every_dependency():
    saga = diamond_with_pivot()
    mermaid = saga.render_mermaid()
    lines = mermaid.splitlines()
    assert lines[0] == "flowchart LR"
    for name in saga.order:
        assert any(line.strip().startswith(f"{name}[") or line.strip().startswith(f"{name}{{")
                   for line in lines)
    edges = {line.strip() for line in lines if "-->" in line}
    assert edges == {
        "reserve --> pay", "reserve --> pack", "pay --> ship", "pack --> ship",
    }
    assert 'ship{{"ship<br/>svc.ship"}}' in mermaid


# --- retry policy ------------------------------------------------------------------------
def test_retry_delay_doubles_each_attempt_until_capped():
    policy = RetryPolicy(backoff=0.5, backoff_max=3.0, jitter=False)
    assert [policy.delay(a) for a in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_retry_delay_for_attempt_zero_is_the_base_backoff():
    assert RetryPolicy(backoff=0.25, jitter=False).delay(0) == 0.25


def test_retry_delay_with_jitter_stays_between_zero_and_the_ceiling():
    random.seed(1234)
    policy = RetryPolicy(backoff=0.5, backoff_max=3.0, jitter=True)
    for attempt in range(1, 8):
        ceiling = min(3.0, 0.5 * 2 ** (attempt - 1))
        samples = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert len(set(samples)) > 1  # actually jittered
        assert max(samples) > ceiling / 2


def test_retry_policy_needs_at_least_one_attempt():
    with pytest.raises(DefinitionError, match="at least 1"):
        RetryPolicy(attempts=0)


def test_business_errors_are_never_transient():
    assert not RetryPolicy().is_transient(BusinessError("declined"))
    assert not RetryPolicy(transient=(BusinessError,)).is_transient(BusinessError("declined"))

    class CardDeclinedError(BusinessError):
        pass

    assert not RetryPolicy().is_transient(CardDeclinedError())


def test_other_exceptions_are_transient_by_default():
    policy = RetryPolicy()
    assert policy.is_transient(TransientError("503"))
    assert policy.is_transient(TimeoutError())
    assert policy.is_transient(ValueError())


def test_only_listed_exceptions_are_transient_when_a_list_is_given():
    policy = RetryPolicy(transient=(TransientError, TimeoutError))
    assert policy.is_transient(TransientError())
    assert policy.is_transient(TimeoutError())
    assert not policy.is_transient(ValueError())


# --- versions ----------------------------------------------------------------------------
def test_a_saga_is_version_1_unless_told_and_refuses_a_version_below_1():
    assert Saga("v", [step("a")]).version == 1
    assert Saga("v", [step("a")], version=3).version == 3
    for bad in (0, -1, True, "2"):
        with pytest.raises(DefinitionError, match="version must be a whole number"):
            Saga("v", [step("a")], version=bad)  # type: ignore[arg-type]


def test_the_fingerprint_follows_the_graph_and_nothing_else():
    base = Saga("f", [step("a"), step("b")])
    assert Saga("f", [step("a"), step("b")], version=2).fingerprint == base.fingerprint
    assert Saga("f", [step("a"), step("c")]).fingerprint != base.fingerprint, "a renamed step"
    assert Saga("f", [step("a"), step("b", depends_on=())]).fingerprint != base.fingerprint
    queued = Saga("f", [step("a"), Step("b", "svc.b", compensation="svc.undo_b", queue="q2")])
    assert queued.fingerprint != base.fingerprint, "a step moved to another queue"
    assert len(base.fingerprint) == 16
