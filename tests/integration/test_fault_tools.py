"""The fault tools the chaos tests stand on: a private PostgreSQL cluster that goes down on cue
(tests/support/pgcluster.py) and test hosts in network namespaces that can be cut off
(tests/support/netns.py). Both must clean up after themselves, also after a crashed run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.support import netns, pgcluster
from tests.support.pgcluster import PgCluster
from tests.support.services import require_service
from tests.support.workers import ROOT

pytestmark = [pytest.mark.integration]


@pytest.fixture
def can_make_clusters() -> None:
    ok, why = pgcluster.available()
    require_service(ok, f"a private PostgreSQL cluster ({why})")


@pytest.fixture
def can_make_namespaces() -> None:
    ok, why = netns.supported()
    require_service(ok, f"test hosts in network namespaces ({why})")


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _connects(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


@pytest.mark.slow
@pytest.mark.usefixtures("can_make_clusters")
def test_a_private_cluster_restarts_goes_down_and_comes_back_with_its_data():
    pg = PgCluster().start()
    try:
        assert pg.port != 5432 and pg.dir.name.startswith("sagas-pg-")
        dsn = _dsn(pg.create_database("smoke"))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (v int)")
            conn.execute("INSERT INTO t VALUES (1)")

        # a fast restart: the open connection is cut, a new one works, the data is kept
        held = psycopg.connect(dsn, autocommit=True)
        assert pg.restart("fast") < 30
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
        held.close()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT v FROM t").fetchall() == [(1,)]

        # down for 3 s: connections are refused meanwhile, accepted after
        downtime: list[float] = []
        outage = threading.Thread(target=lambda: downtime.append(pg.down_for(3.0)))
        outage.start()
        deadline = time.monotonic() + 10
        while pg.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _connects(dsn), "the server answered while down"
        outage.join(60)
        assert downtime and downtime[0] >= 3.0
        assert _connects(dsn)

        pg.stop("immediate")  # a crash: it recovers on the next start
        assert not _connects(dsn)
        pg.start()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT v FROM t").fetchall() == [(1,)]
    finally:
        pg.close()
    assert not pg.dir.exists()
    assert not _connects(dsn)


_CRASHING_CLUSTER = """
import os, signal, sys
from tests.support.pgcluster import PgCluster
pg = PgCluster().start()
print(pg.dir, pg.admin_dsn(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no cleanup
"""


@pytest.mark.usefixtures("can_make_clusters")
def test_the_cluster_of_a_crashed_run_is_stopped_and_removed_by_the_next():
    out = subprocess.run([sys.executable, "-c", _CRASHING_CLUSTER], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    directory, dsn = out.stdout.split(" ", 1)
    assert Path(directory).exists() and _connects(dsn.strip()), "the leftover runs"
    removed = pgcluster.cleanup_leftovers()
    assert Path(directory) in removed
    assert not Path(directory).exists()
    assert not _connects(dsn.strip())


@pytest.mark.usefixtures("can_make_namespaces")
def test_test_hosts_reach_the_services_until_cut_off_and_again_once_healed():
    network = netns.Network(["a", "b"]).up()
    try:
        assert network.subnet is not None and network.subnet.subnet_of(
            netns.CANDIDATES[0].supernet(new_prefix=16))
        redis = network.start_redis()
        for host in (None, "a", "b"):
            assert network.reachable(host, redis.port), host
        # only our subnet and loopback: a host has no default route
        routes = network.run("a", ["ip", "route"]).stdout
        assert "default" not in routes and str(network.subnet) in routes

        network.partition("a")
        assert not network.reachable("a", redis.port, timeout=1)
        assert network.reachable("b", redis.port), "the other host keeps its link"
        assert network.reachable(None, redis.port)
        network.heal("a")
        assert network.reachable("a", redis.port, timeout=5)
        namespaces = list(network.namespaces)
    finally:
        network.down()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in namespaces)


_CRASHING_NETWORK = """
import os, signal
from tests.support.netns import Network
network = Network(["x"]).up()
print(" ".join(network.namespaces), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.usefixtures("can_make_namespaces")
def test_the_namespaces_of_a_crashed_run_are_removed_by_the_next():
    out = subprocess.run([sys.executable, "-c", _CRASHING_NETWORK], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL, out.stderr
    left = out.stdout.split()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert left and all(ns in listed for ns in left)
    removed = netns.cleanup_leftovers()
    assert set(left) <= set(removed)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in left)
    pid = left[0].split("-")[0].removeprefix(netns.PREFIX)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f" sg{pid}" not in links, "the root end of its veth is gone too"


_HOLD_LOCK = """
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1])
conn.execute("SELECT v FROM t WHERE k = 1 FOR UPDATE")
print("locked", flush=True)
if sys.argv[2] == "sending":  # the server is in the middle of sending when the cut comes
    conn.execute("SELECT pg_sleep(2), repeat('x', 64 * 1024 * 1024)").fetchall()
time.sleep(600)  # the transaction stays open; the host is cut off meanwhile
"""

# What README, Running on several machines, asks of the database server.
DROP_VANISHED_CLIENTS = {
    "idle_in_transaction_session_timeout": "'6s'", "tcp_user_timeout": "6000",
    "tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3",
}


def _lock_waits(dsn: str, timeout_s: float) -> bool:
    """Whether taking the row lock from the test's namespace waits past ``timeout_s``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET lock_timeout = '{int(timeout_s * 1000)}ms'")
        try:
            with conn.transaction():
                conn.execute("SELECT v FROM t WHERE k = 1 FOR UPDATE")
            return False
        except psycopg.errors.LockNotAvailable:
            return True


@pytest.mark.slow
@pytest.mark.parametrize("holder", ["idle", "sending"])
@pytest.mark.usefixtures("can_make_namespaces", "can_make_clusters")
def test_a_host_cut_off_mid_transaction_loses_its_locks_with_the_recommended_settings(
    holder: str,
):
    """A host cut off inside a transaction keeps its row locks until the server drops its
    session: waiting for the client's next statement (``idle in transaction``: the idle
    timeout) or in the middle of sending it a result (unacknowledged data: TCP's user
    timeout). Without these settings that takes as long as the cut, or TCP's minutes."""
    network = netns.Network(["x"]).up()
    try:
        pg = network.start_postgres(settings=DROP_VANISHED_CLIENTS)
        dsn = _dsn(pg.create_database("locks"))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (k int PRIMARY KEY, v int)")
            conn.execute("INSERT INTO t VALUES (1, 0)")

        lock_holder = network.popen("x", [sys.executable, "-c", _HOLD_LOCK, dsn, holder],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert lock_holder.stdout is not None and lock_holder.stdout.readline() == b"locked\n"
        network.partition("x")
        began = time.monotonic()
        assert _lock_waits(dsn, 2.0), "the cut-off host's lock holds"
        deadline = began + 40
        while _lock_waits(dsn, 1.0):
            assert time.monotonic() < deadline, "the server never dropped the vanished host"
        released_after = time.monotonic() - began
        assert released_after < 30, released_after  # seconds, not the cut's length or TCP's
        lock_holder.kill()
        lock_holder.wait(10)
    finally:
        network.down()
