"""The trip example (``examples/trip``) run as its README says, with real worker processes.

Two ``celery -A tripapp worker -P prefork`` processes (one for the holds and payments queues,
one for confirmations and the saga queue) run with ``cwd=examples/trip`` against a private
Redis and a temporary SQLite store; this process imports ``tripapp`` too and starts trips with
``engine.start``, from the web handler and from ``python -m tripapp.starter``.
"""

from __future__ import annotations

import collections
import json
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagas.observe import listeners
from tests.examples.procs import (
    PrivateRedis,
    Worker,
    clean_env,
    describe,
    run,
    run_all,
    stop_all,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "trip"
PYTHON = sys.executable
SAGAS = str(Path(sys.executable).parent / "sagas")
HOLDS = ("flight", "hotel", "car")
DECLINED_CARD = "4000000000000002"


def trip_input(**changes: Any) -> dict[str, Any]:
    data = {
        "traveller": "Ada Lovelace", "origin": "LHR", "destination": "LIS",
        "depart": (date.today() + timedelta(days=30)).isoformat(), "nights": 3,
        "amount": "840.00", "card": "4242424242424242", "email": "ada@example.com",
    }
    data.update(changes)
    return data


@dataclass
class Trip:
    """The running example: its environment, its workers, and ``tripapp`` imported here."""

    env: dict[str, str]
    workers: list[Worker]
    module: ModuleType
    steps: ModuleType
    web: ModuleType

    @property
    def engine(self) -> Any:
        return self.module.engine

    def logs(self) -> str:
        return "\n".join(f"=== {w.name}\n{w.log()[-6000:]}" for w in self.workers)

    def sagas(self, *args: str) -> Any:
        return run([SAGAS, "-A", "tripapp", *args], cwd=EXAMPLE, env=self.env, timeout=60)

    def sagas_all(self, *commands: list[str]) -> list[Any]:
        return run_all([[SAGAS, "-A", "tripapp", *c] for c in commands], cwd=EXAMPLE,
                       env=self.env, timeout=60)

    def wait(self, saga_id: str, timeout: float = 30) -> Any:
        try:
            return self.engine.handle(saga_id).wait(timeout=timeout)
        except Exception as exc:
            raise AssertionError(f"saga {saga_id}: {exc}\n{self.logs()}") from exc


def _import_tripapp() -> tuple[ModuleType, ModuleType, ModuleType]:
    for name in [m for m in sys.modules if m == "tripapp" or m.startswith("tripapp.")]:
        del sys.modules[name]
    import tripapp
    import tripapp.steps
    import tripapp.web

    return tripapp, tripapp.steps, tripapp.web


@pytest.fixture(scope="module")
def trip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trip]:
    tmp = tmp_path_factory.mktemp("trip")
    redis = PrivateRedis()
    settings = {
        "REDIS_URL": redis.url,
        "DATABASE_URL": f"sqlite:///{tmp}/trips.db",
        "TRIP_LEDGER": str(tmp / "ledger.db"),
        "TRIP_NOTIFY_FLAKES": "1",  # the mail gateway refuses each trip's first try
    }
    env = clean_env(PYTHONPATH=str(EXAMPLE), **settings)
    workers: list[Worker] = []
    # Sagas(app, settings) adds its listeners to this process's (they are process-wide):
    # put back what the suite had, so importing tripapp here changes nothing after.
    saved_listeners = (dict(listeners._builders), listeners._active)
    with pytest.MonkeyPatch.context() as mp:
        try:
            upgrade = run([SAGAS, "-A", "tripapp", "db", "upgrade"], cwd=EXAMPLE, env=env)
            assert upgrade.returncode == 0, describe(upgrade)
            workers = [
                Worker(PYTHON, "tripapp", ("holds", "payments"), cwd=EXAMPLE, env=env,
                       log_dir=tmp, name="holds").start(),
                Worker(PYTHON, "tripapp", ("confirmations", "saga"), cwd=EXAMPLE, env=env,
                       log_dir=tmp, name="confirm").start(),
            ]
            # This process starts trips too: tripapp reads the same settings at import.
            for key, value in settings.items():
                mp.setenv(key, value)
            mp.delenv("SAGAS_APP", raising=False)
            mp.syspath_prepend(str(EXAMPLE))
            module, steps, web = _import_tripapp()
            assert module.engine.settings.database_url == settings["DATABASE_URL"]
            for worker in workers:
                worker.wait_ready()
            yield Trip(env, workers, module, steps, web)
        finally:
            stop_all(workers)
            redis.stop()
            listeners._builders.clear()
            listeners._builders.update(saved_listeners[0])
            listeners._active = saved_listeners[1]
            for name in [m for m in sys.modules if m == "tripapp" or m.startswith("tripapp.")]:
                del sys.modules[name]


@pytest.fixture(scope="module")
def completed(trip: Trip) -> Any:
    handle = trip.engine.start(trip.module.trip, trip_input())
    return trip.wait(handle.id)


def test_a_trip_completes_with_every_step_and_its_results(trip: Trip, completed: Any) -> None:
    assert completed.state == "COMPLETED", trip.logs()
    assert completed.succeeded and completed.error is None
    assert list(completed.steps) == ["flight", "hotel", "car", "charge", "confirm", "notify"]
    assert {n: s.state for n, s in completed.steps.items()} == dict.fromkeys(
        completed.steps, "SUCCEEDED")
    results = completed.results
    holds = [results[n]["hold"] for n in HOLDS]
    assert [h[:3] for h in holds] == ["FL-", "HT-", "CR-"]
    assert results["flight"]["route"] == "LHR-LIS"
    assert results["charge"]["amount"] == "840.00"
    assert results["charge"]["card"] == "4242"  # the ledger keeps no card number
    assert results["charge"]["holds"] == holds  # the join saw all three holds
    assert results["confirm"]["booking"].startswith("TRIP-")
    assert [results["confirm"][n] for n in HOLDS] == holds
    # notify was refused once by the gateway and retried forward (after the pivot).
    assert results["notify"] == {"sent_to": "ada@example.com", "tries": 2,
                                 "booking": results["confirm"]["booking"]}
    assert completed.steps["notify"].attempts == 2
    # A hold may be retried when the ledger's SQLite file is busy on a loaded machine (a
    # transient error): whatever the attempts, each effect is in the ledger exactly once.
    assert all(completed.steps[n].attempts >= 1 for n in (*HOLDS, "charge", "confirm"))
    effects = [(step, kind) for _, step, kind, _ in trip.steps.effects(completed.id)]
    assert sorted(effects) == sorted([*((n, "hold") for n in HOLDS), ("charge", "charge"),
                                      ("confirm", "confirm"), ("notify", "notify")])


def test_a_declined_card_releases_the_three_holds_after_the_charge_failed(trip: Trip) -> None:
    result = run([PYTHON, "-m", "tripapp.starter", "--card", DECLINED_CARD, "--json",
                  "--timeout", "30"], cwd=EXAMPLE, env=trip.env, timeout=60)
    assert result.returncode == 1, describe(result) + trip.logs()  # not completed
    outcome = json.loads(result.stdout)
    assert outcome["state"] == "COMPENSATED", outcome
    assert "CardDeclined" in outcome["error"]
    states = {n: s["state"] for n, s in outcome["steps"].items()}
    assert states == {"flight": "COMPENSATED", "hotel": "COMPENSATED", "car": "COMPENSATED",
                      "charge": "FAILED", "confirm": "SKIPPED", "notify": "SKIPPED"}
    charge = outcome["steps"]["charge"]
    assert charge["attempts"] == 1, "a business refusal is never retried"
    assert charge["compensation_attempts"] == 0, "a refusal proves nothing was charged"
    assert "card declined" in charge["error"]

    # The ledger: the refusal, then the three releases, each of the hold it made.
    effects = trip.steps.effects(outcome["id"])
    seq = {(step, kind): s for s, step, kind, _ in effects}
    assert {kind for _, _, kind, _ in effects} == {"hold", "declined", "release"}
    assert all(seq[(n, "release")] > seq[("charge", "declined")] for n in HOLDS), effects
    released = {step: detail["released"] for _, step, kind, detail in effects
                if kind == "release"}
    assert released == {n: outcome["steps"][n]["result"]["hold"] for n in HOLDS}

    # The engine's history says the same: every release after the charge FAILED.
    show = trip.sagas("show", outcome["id"], "--json")
    assert show.returncode == 0, describe(show)
    events = json.loads(show.stdout)["events"]
    failed = next(e["id"] for e in events if e["step"] == "charge" and e["to_state"] == "FAILED")
    for name in HOLDS:
        undo = [e["id"] for e in events if e["step"] == name and e["to_state"] in (
            "COMPENSATING", "COMPENSATED")]
        assert len(undo) == 2 and min(undo) > failed, events


def test_an_amount_over_the_limit_is_declined_too(trip: Trip) -> None:
    handle = trip.engine.start(trip.module.trip, trip_input(amount="9000.00"))
    outcome = trip.wait(handle.id)
    assert outcome.state == "COMPENSATED"
    assert "over the limit of 5000" in (outcome.steps["charge"].error or "")
    assert all(outcome.steps[n].state == "COMPENSATED" for n in HOLDS)


def test_a_start_from_the_web_handler_thread_waits_to_completed(
    trip: Trip, monkeypatch: pytest.MonkeyPatch
) -> None:
    started_in: list[str] = []
    real_start = trip.engine.start

    def spy(*args: Any, **kwargs: Any) -> Any:
        started_in.append(threading.current_thread().name)
        return real_start(*args, **kwargs)

    monkeypatch.setattr(trip.engine, "start", spy)
    server = trip.web.make_server(port=0)
    serving = threading.Thread(target=server.serve_forever, name="http-server", daemon=True)
    serving.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def call(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, Any], Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, method=method,
                                         headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())

    try:
        key = {"Idempotency-Key": "web-trip-1"}
        status, headers, body = call("POST", "/trips", trip_input(traveller="Grace"), key)
        assert status == 202, body
        saga_id = body["id"]
        assert headers["Location"] == f"/trips/{saga_id}"
        assert started_in and started_in[0] not in ("MainThread", "http-server")

        outcome = trip.wait(saga_id)
        assert outcome.state == "COMPLETED"
        assert outcome.steps["notify"].result["sent_to"] == "ada@example.com"

        status, _, body = call("GET", f"/trips/{saga_id}")
        assert status == 200
        assert body["state"] == "COMPLETED"
        assert body["steps"] == dict.fromkeys(outcome.steps, "SUCCEEDED")

        # The same Idempotency-Key is the same trip; bad input and unknown ids are refused.
        status, _, body = call("POST", "/trips", trip_input(traveller="Grace"), key)
        assert (status, body["id"]) == (202, saga_id)
        status, _, body = call("POST", "/trips", trip_input(nights=0))
        assert status == 422 and "nights" in body["error"]
        status, _, _ = call("GET", "/trips/no-such-trip")
        assert status == 404
    finally:
        server.shutdown()
        server.server_close()


# --- hostile requests to the web handler ---------------------------------------------------------
# The handler is ``http.server``, with no OpenAPI schema for Schemathesis to read: hypothesis
# writes the requests instead, as raw bytes on a socket (so nothing a client library would refuse
# to send is out of reach), and every one must get an HTTP answer below 500.
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=4),
    max_leaves=12,
)
_HOSTILE_VALUE = (st.none() | st.integers() | st.text(max_size=40) | st.floats()
                  | st.just("\u0000") | st.just("9" * 400) | st.just(10**30) | _JSON)


@st.composite
def _hostile_body(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["trip", "mutated", "json", "bytes", "deep", "empty"]))
    if kind == "trip":
        return json.dumps(trip_input(traveller=draw(st.text(min_size=1, max_size=20)))).encode()
    if kind == "mutated":
        data: dict[str, Any] = trip_input()
        field = draw(st.sampled_from([*data, "extra"]))
        data[field] = draw(_HOSTILE_VALUE)
        return json.dumps(data, allow_nan=True).encode()
    if kind == "json":
        return json.dumps(draw(_JSON), allow_nan=True).encode()
    if kind == "deep":
        depth = draw(st.integers(500, 100_000))
        return b"[" * depth + b"]" * depth
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return b""


_NO_SPACE = st.characters(codec="latin-1").filter(lambda c: not c.isspace())
_PATHS = st.one_of(
    st.just("/trips"), st.just("/trips/"),
    st.builds(lambda s: "/trips/" + s, st.text(_NO_SPACE, max_size=80)),
    st.builds(lambda s: "/trips/" + s, st.sampled_from(["%00", "a" * 5000, "..%2f..", "?x=1"])),
    st.text(_NO_SPACE, max_size=40),
)
# "\xb2" is "²", a digit to str.isdigit and not to int().
_LENGTHS = st.one_of(st.just("match"), st.just(None), st.sampled_from(
    ["-1", "abc", "1e3", " 12", "99999999999999999999", "0", "65537", "0x10", "\xb2"]))


@st.composite
def _hostile_request(draw: st.DrawFn) -> bytes:
    """A raw request; it carries body bytes only where the handler reads them.

    A server that answers without reading what was sent closes on unread data, and the TCP
    reset that follows can destroy its answer in flight: that would test the kernel, not us.
    """
    method = draw(st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH"]))
    path = draw(_PATHS) or "/"
    body = draw(_hostile_body())
    length = draw(_LENGTHS)
    if length == "match":
        length = str(len(body))
    read = method == "POST" and path.rstrip("/") == "/trips" and length is not None and (
        length.strip().isascii() and length.strip().isdigit() and int(length) <= 64 * 1024)
    if read and length is not None:
        body = body[:int(length)]
        length = length if int(length) == len(body) else str(len(body))
    else:
        body = b""
    headers = ["Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        headers.append(f"Content-Length: {length}")
    key = draw(st.none() | st.text(
        st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=300))
    if key is not None:
        headers.append(f"Idempotency-Key: {key}")
    head = f"{method} {path} HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\n\r\n"
    return head.encode("latin-1") + body


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_hostile_requests_to_the_web_handler_get_no_server_error(trip: Trip) -> None:
    server = trip.web.make_server(port=0)
    serving = threading.Thread(target=server.serve_forever, name="http-hostile", daemon=True)
    serving.start()
    port = server.server_address[1]
    seen: collections.Counter[int] = collections.Counter()

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=_hostile_request())
    def one(request: bytes) -> None:
        answer = _exchange(port, request)
        status = answer.split(b"\r\n", 1)[0].split(b" ")
        assert len(status) >= 2 and status[0].startswith(b"HTTP/1."), (
            f"no HTTP answer to {request[:300]!r}: {answer[:200]!r}")
        code = int(status[1])
        seen[code] += 1
        assert code < 500, f"{code} for {request[:300]!r}: {answer[:300]!r}"

    try:
        one()
    finally:
        server.shutdown()
        server.server_close()
    # The generated requests reached the handler's own answers, not only the parser's 400s.
    assert {202, 404, 422} <= set(seen), seen


def test_the_cli_shows_audits_and_refuses_to_undo_a_completed_trip(
    trip: Trip, completed: Any
) -> None:
    show, missing, cancel, graph, audit = trip.sagas_all(
        ["show", completed.id, "--json"], ["show", "no-such-trip", "--json"],
        ["cancel", completed.id], ["graph", "trip"], ["audit", "--json"],
    )
    assert show.returncode == 0, describe(show)
    view = json.loads(show.stdout)
    assert (view["id"], view["name"], view["state"]) == (completed.id, "trip", "COMPLETED")
    assert [s["state"] for s in view["steps"]] == ["SUCCEEDED"] * 6
    assert view["context"]["results"]["confirm"] == completed.results["confirm"]

    assert missing.returncode == 2, describe(missing)

    assert cancel.returncode == 1, describe(cancel)
    assert cancel.stderr.strip() == f"error: saga {completed.id} is COMPLETED; only a running " \
        "saga cancels", describe(cancel)

    assert graph.returncode == 0, describe(graph)
    assert "confirm [pivot]" in graph.stdout
    assert "after flight, hotel, car" in graph.stdout

    assert audit.returncode == 0, describe(audit)
    report = json.loads(audit.stdout)
    assert report["ok"] is True and report["violations"] == []
    assert report["sagas"] > 0
    assert set(report["states"]) <= {"COMPLETED", "COMPENSATED"}
