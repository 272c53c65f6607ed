"""What the runtime works with: one Celery app, its settings, its sagas and its store.

``Sagas(app, settings)`` (``sagas.engine``) builds one binding per app; the engine's own tasks and
the step wrapper find theirs through ``binding_of(task.app)``, so two apps in one process never
share a store, a registry or a broker connection.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from sagas.definition import Saga
from sagas.errors import DefinitionError, UnknownSagaError, UnknownSagaVersionError
from sagas.settings import SagaSettings
from sagas.store.sql import Store


@dataclass
class Binding:
    app: Celery
    settings: SagaSettings
    versions: dict[str, dict[int, Saga]] = field(default_factory=dict)
    engine: Any = None  # the public ``Sagas`` object that owns this binding
    # Where decided dispatches go instead of the broker (``sagas.testing`` runs them in-process).
    publisher: Callable[[Binding, Saga, Any, list[Any]], None] | None = None
    # ... and where revokes go (``sagas.runtime.revoke``), and what recovery asks about the
    # messages waiting in a queue (``sagas.runtime.waiting``); None: the app's broker.
    revoker: Callable[[Binding, list[str]], None] | None = None
    probe: Callable[[Sequence[str]], dict[str, Any]] | None = None
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
                        url, echo=self.settings.sql_echo,
                        step_order=self._step_order,
                    )
                    self._stores[url] = store
        return store

    @property
    def sagas(self) -> dict[str, Saga]:
        """Each saga name's newest registered version."""
        return {name: by[max(by)] for name, by in self.versions.items()}

    def all_versions(self) -> list[Saga]:
        return [by[v] for by in self.versions.values() for v in sorted(by)]

    def _step_order(self, name: str, version: int) -> Sequence[str] | None:
        saga = self.find(name, version)
        return saga.order if saga is not None else None

    def saga(self, name: str, version: int | None = None) -> Saga:
        """The definition of ``name`` at ``version`` (the newest when None)."""
        by = self.versions.get(name)
        if not by:
            raise UnknownSagaError(
                f"no saga named {name!r} is registered with the engine of app "
                f"{self.app.main!r} (known: {sorted(self.versions) or 'none'})"
            )
        if version is None:
            return by[max(by)]
        try:
            return by[version]
        except KeyError:
            raise UnknownSagaVersionError(
                f"saga {name!r} has no version {version} in this process "
                f"(registered: {', '.join(f'v{v}' for v in sorted(by))})"
            ) from None

    def find(self, name: str, version: int) -> Saga | None:
        return self.versions.get(name, {}).get(version)

    def add(self, saga: Saga) -> None:
        by = self.versions.setdefault(saga.name, {})
        existing = by.get(saga.version)
        if existing is not None and existing is not saga:
            raise DefinitionError(
                f"a different saga named {saga.name!r} v{saga.version} is already registered "
                f"with app {self.app.main!r}: give the new graph a new version"
            )
        by[saga.version] = saga


_BOUND: weakref.WeakKeyDictionary[Celery, Binding] = weakref.WeakKeyDictionary()


def bind(binding: Binding) -> None:
    if binding.app in _BOUND:
        raise DefinitionError(f"Celery app {binding.app.main!r} already has a saga engine")
    _BOUND[binding.app] = binding


def binding_of(app: Celery) -> Binding | None:
    return _BOUND.get(app)
