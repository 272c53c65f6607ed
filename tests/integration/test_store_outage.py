"""The database goes away at the worst moment: a step's effect is applied, and the transition
that records its success meets a server that is gone.

A private PostgreSQL cluster (tests/support/pgcluster.py) under a private deployment
(tests/chaos/cluster.py). The pivot ``p`` of ``t_crashy_pivot`` applies its effect (a file, per
idempotency key), then the first statement recording its success waits, the test stops the
server (fast: every connection is cut) and lets the statement go on. The coordinator's queue is
served only once the server is back, so what the engine makes of that failure is decided on a
working database.

What must happen: the effect happened, so the saga must not compensate as if it had not; it
completes once the database is back (whether the outcome waits on the saga queue or recovery
re-drives the step with the same key is the engine's choice).

Found by tests/chaos/test_hosts.py on the store before the saga log: a host cut off mid-pivot,
whose soft time limit fired in the middle of recording the success once the cut healed. The
wrapper's ``StoreUnavailableError`` then reached ``sagas.step_failed`` as a *definite*
failure, the pivot was recorded FAILED and the saga COMPENSATED with its shipment made (the
audit: "compensated: no shipment"). The rewritten store hands such an outcome to the saga
queue; this pins it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.cluster import Cluster
from tests.support import pgcluster
from tests.support.pgcluster import PgCluster
from tests.support.services import require_service

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Cluster, PgCluster]]:
    ok, why = pgcluster.available()
    require_service(ok, f"a private PostgreSQL cluster ({why})")
    pg = PgCluster().start()
    cluster = Cluster(tmp_path / "deploy", database_url=pg.create_database("sagas"),
                      env={"SAGAS_APP": "config"})
    try:
        cluster.migrate()
        yield cluster, pg
    finally:
        cluster.stop()
        pg.close()


def _wait_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


@pytest.mark.timeout(300)
def test_a_pivot_whose_success_could_not_be_recorded_completes_once_the_database_is_back(
    deployment: tuple[Cluster, PgCluster],
):
    cluster, pg = deployment
    steps = cluster.start_worker("crashy", "crashy", concurrency=1)
    steps.wait_ready(60)
    body = {"plan": {"p": {"crash": "store_down_on_record"}}}
    saga_id = cluster.client("start", "t_crashy_pivot", json.dumps(body))["id"]

    markers = Path(cluster.env["CRASHY_DIR"]) / "markers"
    tag = f"{saga_id}.p.action"
    _wait_file(markers / f"{tag}.recording")  # p's effect is applied, its success not recorded
    assert cluster.effect(f"{saga_id}:p")
    pg.stop("fast")
    (markers / f"{tag}.db-down").touch()
    # the recording fails; what the worker does next is the engine's business (it may end the
    # task, or hold it and retry): give it a few seconds of outage either way
    ended = re.compile(rf"Task crashy\.act\[{re.escape(saga_id)}\.p\.do\.\d+\] (?!received)")
    deadline = time.monotonic() + 10
    while not ended.search(steps.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    pg.start()

    # the coordinator's queue and the reconciler, on a database that works again
    cluster.start_worker("saga", "saga", concurrency=2).wait_ready(60)
    cluster.start_beat()
    view = cluster.wait_for(saga_id, timeout=90)
    steps_by_name = {s["name"]: s for s in view["steps"]}
    assert cluster.effect(f"{saga_id}:p"), "the pivot's effect stays applied"
    assert view["state"] == "COMPLETED", (
        f"the pivot applied its effect, yet the saga is {view['state']} with p "
        f"{steps_by_name['p']['state']} ({steps_by_name['p']['error']})")
    assert cluster.effect(f"{saga_id}:z")
    assert not cluster.effect(f"{saga_id}:a", "compensation")


@pytest.mark.timeout(300)
def test_an_outcome_waits_out_a_long_outage_on_the_saga_queue(
    deployment: tuple[Cluster, PgCluster],
):
    """The coordinator serves its queue through 25 s of outage and no reconciler runs: the
    handed-over success must be retried until the database answers, however long that takes
    (Celery reads ``retry(max_retries=None)`` as the task's cap of 3, about 7 s of backoff)."""
    cluster, pg = deployment
    cluster.start_workers({"crashy": ("crashy", 1), "saga": ("saga", 1)})
    body = {"plan": {"p": {"crash": "store_down_on_record"}}}
    saga_id = cluster.client("start", "t_crashy_pivot", json.dumps(body))["id"]

    markers = Path(cluster.env["CRASHY_DIR"]) / "markers"
    tag = f"{saga_id}.p.action"
    _wait_file(markers / f"{tag}.recording")
    pg.stop("fast")
    (markers / f"{tag}.db-down").touch()
    time.sleep(25)
    pg.start()

    view = cluster.wait_for(saga_id, timeout=90)  # no beat: only the held outcome can finish it
    assert view["state"] == "COMPLETED"
    saga_log = cluster.workers["saga"].log()
    assert "sagas.step_succeeded" in saga_log and "Retry in" in saga_log
    assert "MaxRetriesExceeded" not in saga_log
    assert not cluster.redrives()
    assert cluster.calls(saga_id, "p") == 1, "the pivot ran once; its outcome was held"
