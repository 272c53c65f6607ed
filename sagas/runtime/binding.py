"""What the runtime works with: one Celery app, its settings, its sagas and its store.

``Sagas(app, settings)`` (``sagas.engine``) builds one binding per app; the engine's own tasks and
the step wrapper find theirs through ``binding_of(task.app)``, so two apps in one process never
share a store, a registry or a broker connection.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from sagas.definition import Saga
from sagas.errors import DefinitionError, UnknownSagaError
from sagas.settings import SagaSettings
from sagas.store.sql import Store


@dataclass
class Binding:
    app: Celery
    settings: SagaSettings
    sagas: dict[str, Saga] = field(default_factory=dict)
    engine: Any = None  # the public ``Sagas`` object that owns this binding
    _stores: dict[str, Store] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def store(self) -> Store:
        """The store of the current ``settings.database_url`` (settings may be replaced)."""
        url = self.settings.database_url
        store = self._stores.get(url)
        if store is None:
            with self._lock:
                store = self._stores.get(url)
                if store is None:
                    store = Store(
                        url, echo=self.settings.sql_echo, outbox=self.settings.sagas_outbox,
                        step_order=self._step_order,
                    )
                    self._stores[url] = store
        return store

    def _step_order(self, name: str) -> Sequence[str] | None:
        saga = self.sagas.get(name)
        return saga.order if saga is not None else None

    def saga(self, name: str) -> Saga:
        try:
            return self.sagas[name]
        except KeyError:
            raise UnknownSagaError(
                f"no saga named {name!r} is registered with the engine of app "
                f"{self.app.main!r} (known: {sorted(self.sagas) or 'none'})"
            ) from None

    def add(self, saga: Saga) -> None:
        existing = self.sagas.get(saga.name)
        if existing is not None and existing is not saga:
            raise DefinitionError(
                f"a different saga named {saga.name!r} is already registered with app "
                f"{self.app.main!r}"
            )
        self.sagas[saga.name] = saga


_BOUND: weakref.WeakKeyDictionary[Celery, Binding] = weakref.WeakKeyDictionary()


def bind(binding: Binding) -> None:
    if binding.app in _BOUND:
        raise DefinitionError(f"Celery app {binding.app.main!r} already has a saga engine")
    _BOUND[binding.app] = binding


def binding_of(app: Celery) -> Binding | None:
    return _BOUND.get(app)
