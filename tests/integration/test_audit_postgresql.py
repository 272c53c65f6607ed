"""`sagas audit` on PostgreSQL: the books of a fresh store are clean and it says so.

It once crashed there with "psycopg.ProgrammingError: can't change 'autocommit' now":
the store's checkout ping (``_ping_when_idle``) left its ``SELECT 1`` transaction open and the
audit's REPEATABLE READ was refused. SQLite never showed it; this test keeps PostgreSQL honest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.services import (
    create_pg_database,
    drop_pg_database,
    postgres_reachable,
    require_service,
)
from tests.support.workers import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SAGAS_CLI = "import sys; from sagas.ops.cli import main; sys.argv[0] = 'sagas'; main()"


def test_sagas_audit_on_postgresql_reports_a_clean_store():
    require_service(postgres_reachable(), "PostgreSQL at 127.0.0.1:5432")
    name, url = create_pg_database()
    env = dict(os.environ, DATABASE_URL=url, SAGAS_APP="config", SAGAS_IMPORTS="",
               PYTHONPATH=str(ROOT))
    try:
        for args in (["-c", SAGAS_CLI, "db", "upgrade"], ["-m", "tasks.migrate"]):
            subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True,
                           capture_output=True, timeout=120)
        audit = subprocess.run([sys.executable, "-c", SAGAS_CLI, "audit", "--json"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=120)
        assert "Traceback" not in audit.stderr, audit.stderr[-2000:]
        assert audit.returncode == 0, audit.stderr
        report = json.loads(audit.stdout)
        assert report["ok"] is True and report["sagas"] == 0
    finally:
        drop_pg_database(name)
