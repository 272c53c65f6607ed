"""The order sample's own tables (stock, reservations, charges, shipments, orders), by Alembic.

They live under their own version table, apart from the engine's: ``sagas db upgrade`` creates
only the saga tables; ``python -m tasks.migrate`` (run by ``make demo``, ``make web`` and the
Procfile's ``web``) creates these.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from tasks.db import get_engine

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "orders_alembic_version"


def upgrade(revision: str = "heads") -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(MIGRATIONS / "versions"))
    with get_engine().begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


if __name__ == "__main__":
    upgrade()
    print("order tables up to date")
