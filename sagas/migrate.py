"""Schema by Alembic: the engine's migrations plus any a domain registers beside them."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config

from sagas.runtime import get_store

_HERE = Path(__file__).parent / "migrations"
_VERSION_LOCATIONS: list[str] = [str(_HERE / "versions")]


def add_version_location(path: str | os.PathLike[str]) -> None:
    """A domain (like the order services) adds its own migration folder."""
    location = str(Path(path).resolve())
    if location not in _VERSION_LOCATIONS:
        _VERSION_LOCATIONS.append(location)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", os.pathsep.join(_VERSION_LOCATIONS))
    return cfg


def upgrade(revision: str = "heads") -> None:
    cfg = alembic_config()
    with get_store().engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
