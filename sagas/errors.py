"""Every error the engine raises, under one root so callers can catch ``SagaError``."""

from __future__ import annotations


class SagaError(Exception):
    """Root of every error raised by the saga engine."""


# --- definition time -------------------------------------------------------
class DefinitionError(SagaError):
    """A saga graph that can never run correctly; raised when the saga is defined."""


class DuplicateStepError(DefinitionError):
    pass


class UnknownDependencyError(DefinitionError):
    pass


class CycleError(DefinitionError):
    pass


class CompensationAfterPivotError(DefinitionError):
    pass


class UnknownSagaError(SagaError):
    """No saga definition with that name is registered in this process."""


# --- run time --------------------------------------------------------------
class InvalidTransitionError(SagaError):
    """A state change outside the transition table."""


class SagaNotFoundError(SagaError):
    pass


class InvalidSagaInputError(SagaError):
    """The saga input is not a JSON object or fails its pydantic model."""


class IdempotencyConflictError(SagaError):
    """An idempotency key reused with a different payload."""


class SagaStateError(SagaError):
    """An operator action that the saga's current state does not allow."""


class StoreUnavailableError(SagaError):
    """The database or Redis cannot be reached."""


# --- raised by participants ------------------------------------------------
class StepFailure(SagaError):
    """Base for what a participant raises to steer retries."""


class BusinessError(StepFailure):
    """A final, expected refusal (declined card, out of stock): never retried."""


class TransientError(StepFailure):
    """A passing fault (timeout, lock, 503): retried with backoff."""


class StepOutcomeUnknown(StepFailure):
    """Raised by the engine for a step whose failure says nothing about its effect.

    Retries spent or a time limit hit after the effect may have committed: the engine compensates
    such a step (compensations are idempotent and tolerate a missing effect).
    """
