"""sagas: distributed transactions as task-graph sagas on Celery.

The public API is what this module exports; everything else is internal.
"""

from sagas.context import StepContext
from sagas.definition import RetryPolicy, Saga, Step, get_saga, registered_sagas
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
    SagaNotFoundError,
    SagaStateError,
    StepOutcomeUnknown,
    StoreUnavailableError,
    TransientError,
    UnknownDependencyError,
    UnknownSagaError,
)
from sagas.runtime import apply_event, get_store, start_saga
from sagas.states import SagaState, StepState

__all__ = [
    "BusinessError",
    "CompensationAfterPivotError",
    "CycleError",
    "DefinitionError",
    "DuplicateStepError",
    "IdempotencyConflictError",
    "InvalidSagaInputError",
    "InvalidTransitionError",
    "RetryPolicy",
    "Saga",
    "SagaError",
    "SagaNotFoundError",
    "SagaState",
    "SagaStateError",
    "Step",
    "StepContext",
    "StepOutcomeUnknown",
    "StepState",
    "StoreUnavailableError",
    "TransientError",
    "UnknownDependencyError",
    "UnknownSagaError",
    "apply_event",
    "get_saga",
    "get_store",
    "registered_sagas",
    "start_saga",
]
