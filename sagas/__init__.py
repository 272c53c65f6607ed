"""sagas: distributed transactions as task-graph sagas on Celery.

The public API is what this module exports (pinned by ``tests/unit/test_public_api.py``);
everything else is internal. Start with ``Sagas(app, settings)``.
"""

from sagas.coordinator import Decision, Ignored, IgnoreKind
from sagas.definition import LockPolicy, RetryPolicy, Saga, Step
from sagas.engine import AuditCheck, Sagas
from sagas.errors import (
    BusinessError,
    CompensationAfterPivotError,
    CycleError,
    DefinitionError,
    DuplicateStepError,
    IdempotencyConflictError,
    InvalidSagaInputError,
    InvalidTransitionError,
    SagaError,
    SagaLockedError,
    SagaNotFoundError,
    SagaStateError,
    SagaTimeoutError,
    StepOutcomeUnknown,
    StoreUnavailableError,
    TransientError,
    UnknownDependencyError,
    UnknownSagaError,
)
from sagas.observe.listeners import (
    SagaListener,
    StepAttempt,
    TransitionEvent,
)
from sagas.observe.listeners import (
    register as register_listener,
)
from sagas.observe.listeners import (
    unregister as unregister_listener,
)
from sagas.runtime.handle import SagaHandle, SagaOutcome, StepOutcome
from sagas.runtime.message import StepContext
from sagas.runtime.starter import StartTask
from sagas.settings import SagaSettings
from sagas.states import SagaState, StepState

__all__ = [
    "AuditCheck",
    "BusinessError",
    "CompensationAfterPivotError",
    "CycleError",
    "Decision",
    "DefinitionError",
    "DuplicateStepError",
    "IdempotencyConflictError",
    "IgnoreKind",
    "Ignored",
    "InvalidSagaInputError",
    "InvalidTransitionError",
    "LockPolicy",
    "RetryPolicy",
    "Saga",
    "SagaError",
    "SagaHandle",
    "SagaListener",
    "SagaLockedError",
    "SagaNotFoundError",
    "SagaOutcome",
    "SagaSettings",
    "SagaState",
    "SagaStateError",
    "SagaTimeoutError",
    "Sagas",
    "StartTask",
    "Step",
    "StepAttempt",
    "StepContext",
    "StepOutcome",
    "StepOutcomeUnknown",
    "StepState",
    "StoreUnavailableError",
    "TransientError",
    "TransitionEvent",
    "UnknownDependencyError",
    "UnknownSagaError",
    "register_listener",
    "unregister_listener",
]
