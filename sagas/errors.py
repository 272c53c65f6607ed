"""Every error the engine raises, under one root so callers can catch ``SagaError``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import redis.exceptions
import sqlalchemy.exc
from kombu.exceptions import OperationalError as KombuOperationalError


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


class UnknownSagaVersionError(UnknownSagaError):
    """The saga is known here, but not the version an instance was started with."""


# --- run time --------------------------------------------------------------
class InvalidTransitionError(SagaError):
    """A state change outside the transition table."""


class SagaNotFoundError(SagaError):
    pass


class InvalidSagaInputError(SagaError):
    """The saga input is not a JSON object or fails its pydantic model."""


class SagaLockedError(SagaError):
    """A start refused because a semantic lock its saga needs is held (policy ``reject``)."""

    def __init__(self, message: str, *, key: str, holder: str) -> None:
        super().__init__(message)
        self.key = key
        self.holder = holder


class IdempotencyConflictError(SagaError):
    """An idempotency key reused with a different payload."""


class SagaStateError(SagaError):
    """An operator action that the saga's current state does not allow."""


class StoreUnavailableError(SagaError):
    """The saga store's database cannot be reached."""


class SagaTimeoutError(SagaError, TimeoutError):
    """``SagaHandle.wait`` gave up before the saga settled; the saga itself goes on."""


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


class RefusedAfterPivot(StepFailure):
    """Raised by the engine for a business refusal of a step past the pivot.

    Such a step cannot be compensated and would refuse again: the saga parks as FORWARD_FAILED
    (an operator fixes the cause, then ``sagas retry``) instead of sending it again.
    """


class ActionRevoked(StepFailure):
    """An action message that was never run: its saga was called off before it started.

    Reported in place of its outcome. Another delivery of the step may have run, so the step is
    compensated (compensations tolerate a missing effect).
    """


# --- outages ---------------------------------------------------------------
class OutageKind(StrEnum):
    DATABASE = "database"
    BROKER = "broker"


@dataclass(frozen=True)
class Outage:
    """A server that cannot be reached, with the driver's first line for people."""

    kind: OutageKind
    message: str


OUTAGE_TYPES: tuple[type[Exception], ...] = (
    StoreUnavailableError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
    KombuOperationalError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
    ConnectionError,
)
"""The exception types ``outage_of`` may classify (for frameworks that dispatch by type)."""


def outage_of(exc: BaseException) -> Outage | None:
    """The one classifier of "a server is down" used by the CLI, the API and recovery."""
    if isinstance(exc, StoreUnavailableError):
        return Outage(OutageKind.DATABASE, _first_line(exc))
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return Outage(OutageKind.DATABASE, _first_line(exc.orig or exc))
    if isinstance(
        exc, KombuOperationalError | redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError | ConnectionError
    ):
        return Outage(OutageKind.BROKER, _first_line(exc))
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
