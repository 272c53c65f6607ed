"""The public surface is what ``sagas.__all__`` says: adding or removing a name is a decision."""

from __future__ import annotations

import sagas

EXPECTED = {
    # the binding and its settings
    "Sagas", "SagaSettings", "AuditCheck",
    # declaring sagas
    "Saga", "Step", "RetryPolicy", "StepContext", "LockPolicy",
    # running them: the handle and what it reads, a durable start task for ``.delay`` callers
    "SagaHandle", "SagaOutcome", "StepOutcome", "SagaState", "StepState", "StartTask",
    # what retry and cancel answer, and why an event changed nothing
    "Decision", "Ignored", "IgnoreKind",
    # listeners
    "SagaListener", "TransitionEvent", "StepAttempt", "register_listener",
    "unregister_listener",
    # errors, under one root
    "SagaError", "DefinitionError", "DuplicateStepError", "UnknownDependencyError",
    "CycleError", "CompensationAfterPivotError", "UnknownSagaError", "InvalidTransitionError",
    "SagaNotFoundError", "InvalidSagaInputError", "IdempotencyConflictError", "SagaStateError",
    "StoreUnavailableError", "SagaTimeoutError", "BusinessError", "TransientError",
    "StepOutcomeUnknown", "SagaLockedError",
}


def test_the_public_api_is_exactly_the_pinned_names():
    assert set(sagas.__all__) == EXPECTED
    assert len(sagas.__all__) == len(set(sagas.__all__)), "no name exported twice"


def test_every_exported_name_resolves():
    for name in sagas.__all__:
        assert getattr(sagas, name) is not None, name


def test_internal_plumbing_is_not_exported():
    for internal in ("apply_event", "get_store", "start_saga", "get_saga", "registered_sagas",
                     "Store", "Binding"):
        assert internal not in sagas.__all__
        assert not hasattr(sagas, internal), f"sagas.{internal} leaks internal plumbing"


def test_every_error_the_engine_exports_has_the_one_root():
    errors = [getattr(sagas, n) for n in sagas.__all__
              if isinstance(getattr(sagas, n), type)
              and issubclass(getattr(sagas, n), BaseException)]
    assert errors and all(issubclass(e, sagas.SagaError) for e in errors)
