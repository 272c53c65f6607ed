"""The engine's schema, by Alembic: only the engine's own tables, under its own version table.

An application's tables are its own business: it keeps its own migrations and version table
(the order sample does, in ``tasks/migrations``), so ``sagas db upgrade`` never creates them.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "sagas_alembic_version"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(MIGRATIONS / "versions"))
    cfg.attributes["version_table"] = VERSION_TABLE
    return cfg


def upgrade(engine: Engine, revision: str = "heads") -> None:
    """Bring the saga tables of ``engine``'s database up to ``revision``."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
