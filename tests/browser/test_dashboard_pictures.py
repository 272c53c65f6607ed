"""The saga page's pictures, actions and the list's filters, in Debian's headless Chromium.

Sagas of each kind (completed, compensated through a join, parked, stalled, retried forward
past a pivot, and the sample's order saga completed and declined) are run by real workers and
drawn at 1400 and 800 px wide. On every page: no label leaves its node's box, every SVG text
has a contrast of at least 4.5:1 against the fill behind it, no edge passes through a node, and
nothing makes the page scroll sideways. Screenshots land in artifacts/dashboard-<kind>-<px>.png.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from sagas.ops.dashboard import CANCEL_REASON
from tests.browser.support import (
    ARTIFACTS,
    PICTURES,
    TOKEN,
    console_errors,
    contrast,
    js,
    wait_until,
)
from tests.conftest import Backend, wait_for_saga
from tests.support import test_sagas as ts
from tests.support.engine import make_stale as age_saga
from tests.support.engine import start_saga

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("backend", ["sqlite"], indirect=True),  # one browser run is enough
]

WIDTHS = [1400, 800]


# --- the sagas ---------------------------------------------------------------------------------
def make_stale(saga_id: str, seconds: float = 90) -> None:
    """Its work in flight made no progress for a long while (see tests.support.engine)."""
    age_saga(saga_id, seconds)


def _order(price: float) -> str:
    from tasks.order_saga import order_saga

    return start_saga(order_saga, {"customer_id": "browser", "item": "book", "quantity": 1,
                                   "price": price})


def _completed() -> str:
    saga_id = _order(20)
    assert wait_for_saga(saga_id)["state"] == "COMPLETED"
    return saga_id


def _declined() -> str:
    saga_id = _order(900)  # over the payment limit: charge_payment declines, stock is released
    assert wait_for_saga(saga_id)["state"] == "COMPENSATED"
    return saga_id


def _compensated() -> str:
    saga_id = start_saga(ts.diamond, {"plan": {"c": {"fail": True}, "b": {"sleep": 0.4}}})
    assert wait_for_saga(saga_id)["state"] == "COMPENSATED"
    return saga_id


def _parked() -> str:
    saga_id = start_saga(ts.linear, {"plan": {"a": {"undo_fail": True}, "b": {"transient": 1},
                                              "c": {"fail": True}}})
    assert wait_for_saga(saga_id)["state"] == "COMPENSATION_FAILED"
    return saga_id


def _retried() -> str:
    saga_id = start_saga(ts.pivoted, {"plan": {"z": {"transient": 3}}})
    assert wait_for_saga(saga_id)["state"] == "COMPLETED"
    return saga_id


def _stalled() -> str:
    from tests.chaos import crash_sagas as cs  # its queue is served by no worker

    saga_id = start_saga(cs.recovery_unit, {})
    make_stale(saga_id)
    return saga_id


MAKERS = {"completed": _completed, "declined": _declined, "compensated": _compensated,
          "parked": _parked, "retried": _retried, "stalled": _stalled}
_made: dict[str, str] = {}


def saga_of(kind: str) -> str:
    """One saga per kind for the whole module (both widths look at the same saga)."""
    if kind not in _made:
        _made[kind] = MAKERS[kind]()
    return _made[kind]


# --- what the page shows ----------------------------------------------------------------------
PROBE = PICTURES + r"""
return Object.assign(pictures(), {
  state: document.querySelector('#saga-state .badge').dataset.state,
  stalledBadge: !!document.querySelector('#saga-stalled .badge'),
  stallText: document.getElementById('stall-reason').hidden ? null :
             document.getElementById('stall-reason').textContent,
});
"""

EXPECTED: dict[str, dict[str, Any]] = {
    "completed": {"state": "COMPLETED", "pivot": "ship_order", "markers": {"completed"},
                  "steps": {"reserve_inventory": "SUCCEEDED", "charge_payment": "SUCCEEDED",
                            "ship_order": "SUCCEEDED"}},
    "declined": {"state": "COMPENSATED", "pivot": "ship_order",
                 "markers": {"failure", "compensated"},
                 "steps": {"reserve_inventory": "COMPENSATED", "charge_payment": "FAILED",
                           "ship_order": "SKIPPED"}},
    "compensated": {"state": "COMPENSATED", "markers": {"failure", "compensated"},
                    "steps": {"a": "COMPENSATED", "b": "COMPENSATED", "c": "FAILED",
                              "d": "SKIPPED"}},
    "parked": {"state": "COMPENSATION_FAILED", "markers": {"failure", "parked"},
               "steps": {"a": "COMPENSATION_FAILED", "b": "COMPENSATED", "c": "FAILED",
                         "d": "SKIPPED"}},
    "retried": {"state": "COMPLETED", "pivot": "p", "markers": {"completed"},
                "steps": {"a": "SUCCEEDED", "p": "SUCCEEDED", "z": "SUCCEEDED"}},
    "stalled": {"state": "RUNNING", "markers": {"now"},
                "steps": {"a": "RUNNING", "b": "PENDING"}},
}


def open_saga(browser: Any, server: str, saga_id: str, width: int, state: str) -> dict[str, Any]:
    browser.set_window_size(width, 900)
    browser.get(f"{server}/dashboard/sagas/{saga_id}")
    return wait_until(lambda: (lambda p: p if p["state"] == state else None)(js(browser, PROBE)),
                      what=f"the page of a {state} saga")


def screenshot(browser: Any, name: str, width: int) -> None:
    height = js(browser, "return document.documentElement.scrollHeight")
    browser.set_window_size(width, max(900, int(height) + 20))
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / name))
    browser.set_window_size(width, 900)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_the_saga_page_draws_its_graph_and_timeline_legibly(
    engine_backend: Backend, server: str, browser: Any, kind: str, width: int
):
    want = EXPECTED[kind]
    saga_id = saga_of(kind)
    page = open_saga(browser, server, saga_id, width, want["state"])
    assert page["viewport"] == width

    # every node: its full name and state inside its box, in every state, never shrunk to fit
    states = {n["step"]: n["state"] for n in page["nodes"]}
    assert states == want["steps"]
    for n in page["nodes"]:
        assert n["lines"][0] == n["step"], n
        assert n["state"].lower().replace("_", " ") in n["lines"][1], n
    assert page["overflow"] == [], "labels outside their node's box"
    assert page["squeezed"] == [], "the width estimate was too small for Chromium's font"

    # text contrast against the fill behind it, in both pictures and the state badges
    assert [t for t in page["texts"] if t["bg"] is None] == []
    low = [(t["text"], t["fill"], t["bg"], round(contrast(t["fill"], t["bg"]), 2))
           for t in page["texts"] + page["badges"] if contrast(t["fill"], t["bg"]) < 4.5]
    assert low == [], "text below 4.5:1"
    assert {t["where"] for t in page["texts"]} == {"graph", "timeline"}

    # edges go round the boxes, and the page never scrolls sideways
    assert page["crossings"] == [], "an edge passes through a node"
    assert page["collisions"] == [], "timeline labels drawn over each other"
    assert page["pageWidth"] <= page["viewport"], "the page scrolls sideways"
    assert page["graphWidth"] <= page["graphRoom"], "the graph needs scrolling"

    nodes = {n["step"]: n for n in page["nodes"]}
    if "pivot" in want:
        assert "pivot" in nodes[want["pivot"]]["cls"]
        assert [s for s, n in nodes.items() if "pivot" in n["cls"]] == [want["pivot"]]
        assert "pivot" in nodes[want["pivot"]]["lines"][1]
    assert want["markers"] <= set(page["markers"]), page["markers"]

    if kind == "compensated":  # the diamond: b and c side by side in one layer, d joins them
        tb = page["orientation"] == "TB"

        def layer(n: dict[str, Any]) -> float:  # the middle of its box along the layers
            return n["y"] + n["h"] / 2 if tb else n["x"] + n["w"] / 2

        def lane(n: dict[str, Any]) -> float:
            return n["x"] + n["w"] / 2 if tb else n["y"] + n["h"] / 2

        b, c, a, d = nodes["b"], nodes["c"], nodes["a"], nodes["d"]
        assert layer(b) == layer(c) and lane(b) != lane(c)
        assert layer(a) < layer(b) < layer(d)
        assert sorted(e for e in page["edges"] if e[1] == "d") == [["b", "d"], ["c", "d"]]
        assert "join" in d["cls"]
        assert ["c", "action", "failed"] in page["bars"]
        assert ["a", "compensation", "compensated"] in page["bars"]
        assert ["d", "skipped", "skipped"] in page["bars"]
    if kind == "parked":
        assert page["bars"].count(["a", "compensation", "retry"]) == 2
        assert ["a", "compensation", "compensation_failed"] in page["bars"]
        assert ["b", "action", "retry"] in page["bars"]
    if kind == "retried":
        assert ["z", "action", "retry"] in page["bars"]
        assert ["z", "action", "failed"] in page["bars"], "forward retries after the pivot"
    if kind == "stalled":
        a = nodes["a"]
        assert {"in-flight", "stalled"} <= set(a["cls"])
        assert re.fullmatch(r"no progress since \d\d:\d\d:\d\d( UTC)?; recovery re-drives it",
                            a["reason"]), a["reason"]
        assert any(line.startswith("stalled: no progress since") for line in a["lines"])
        assert "stalled" not in nodes["b"]["cls"]
        assert page["stalledBadge"] and "recovery re-drives it" in page["stallText"]
        assert ["a", "action", "running"] in page["bars"]
    else:
        assert not page["stalledBadge"]
    if kind == "completed" and width == 1400:
        assert page["orientation"] == "LR", "left to right when it fits"

    screenshot(browser, f"dashboard-{kind}-{width}.png", width)
    assert console_errors(browser) == []


def test_a_running_sagas_graph_and_timeline_follow_it_live(
    engine_backend: Backend, server: str, browser: Any
):
    saga_id = start_saga(ts.diamond, {"plan": {"b": {"sleep": 2.5}}})
    browser.set_window_size(1400, 900)
    browser.get(f"{server}/dashboard/sagas/{saga_id}")

    def flying() -> Any:
        page = js(browser, PROBE)
        nodes = {n["step"]: n for n in page["nodes"]}
        return page if nodes and "in-flight" in nodes["b"]["cls"] else None

    page = wait_until(flying, what="b in flight")
    assert ["b", "action", "running"] in page["bars"] and "now" in page["markers"]
    assert "live" in browser.find_element("id", "saga-live").text
    done = wait_until(lambda: (lambda p: p if p["state"] == "COMPLETED" else None)(
        js(browser, PROBE)), timeout=30, what="completed, without a reload")
    assert not any("in-flight" in n["cls"] for n in done["nodes"])
    assert "now" not in done["markers"] and "completed" in done["markers"]
    assert ["b", "action", "succeeded"] in done["bars"]
    assert console_errors(browser) == []


# --- retry and cancel -------------------------------------------------------------------------
def _type_token(browser: Any, token: str) -> None:
    field = browser.find_element("id", "admin-token")
    field.clear()
    field.send_keys(token)


def _result(browser: Any) -> str:
    return str(browser.find_element("id", "action-result").text)


def test_an_operator_cancels_a_running_saga_from_its_page(
    engine_backend: Backend, server: str, browser: Any, server_logs: list[str]
):
    saga_id = start_saga(ts.linear, {"plan": {"b": {"sleep": 2.0}}})
    browser.set_window_size(1400, 900)
    browser.get(f"{server}/dashboard/sagas/{saga_id}")
    cancel = browser.find_element("id", "cancel-button")
    wait_until(lambda: cancel.is_enabled(), what="cancel offered while it runs")
    assert not browser.find_element("id", "retry-button").is_enabled()

    _type_token(browser, "not-the-token")
    cancel.click()
    cancel.click()  # the second click confirms
    wait_until(lambda: "refused (403)" in _result(browser), what="a wrong token refused")

    _type_token(browser, TOKEN)
    cancel.click()
    cancel.click()
    wait_until(lambda: "cancel: the saga is" in _result(browser), what="cancel accepted")
    view = wait_for_saga(saga_id)
    assert view["state"] == "COMPENSATED" and view["error"] == CANCEL_REASON
    page = wait_until(lambda: (lambda p: p if {"cancel", "compensated"} <= set(p["markers"])
                                else None)(js(browser, PROBE)), what="the cancel on the timeline")
    assert page["markers"].index("cancel") < page["markers"].index("compensated")
    screenshot(browser, "dashboard-cancelled-1400.png", 1400)

    assert TOKEN not in browser.current_url
    assert js(browser, "return document.cookie") == ""
    assert js(browser, "return localStorage.length + sessionStorage.length") == 0
    assert any("/cancel" in line for line in server_logs), "the access log was captured"
    assert not [line for line in server_logs if TOKEN in line], "the token reached a log line"
    errors = console_errors(browser)
    assert errors and all("/cancel" in e and "403" in e for e in errors), "only the wrong token"


def test_an_operator_retries_a_parked_saga_from_its_page(
    engine_backend: Backend, server: str, browser: Any
):
    saga_id = start_saga(ts.linear, {"plan": {"a": {"undo_fail": True}, "b": {"fail": True}}})
    assert wait_for_saga(saga_id)["state"] == "COMPENSATION_FAILED"
    browser.set_window_size(1400, 900)
    browser.get(f"{server}/dashboard/sagas/{saga_id}")
    retry = browser.find_element("id", "retry-button")
    wait_until(lambda: retry.is_enabled(), what="retry offered to a parked saga")
    assert not browser.find_element("id", "cancel-button").is_enabled()

    retry.click()
    wait_until(lambda: "Type the admin token first" in _result(browser), what="asks for it")
    _type_token(browser, TOKEN)
    retry.click()
    wait_until(lambda: "retry: the saga is" in _result(browser), what="retry accepted")
    # its compensation still fails: parked again, with the request on the timeline
    page = wait_until(lambda: (lambda p: p if p["markers"].count("parked") == 2 else None)(
        js(browser, PROBE)), what="parked again after the retry")
    assert "retry" in page["markers"]
    assert page["markers"].index("retry") < len(page["markers"]) - 1
    assert page["bars"].count(["a", "compensation", "compensation_failed"]) == 2
    assert console_errors(browser) == []


def test_the_actions_need_the_token_and_refuse_cross_site_requests(
    engine_backend: Backend, server: str
):
    saga_id = start_saga(ts.linear, {})
    assert wait_for_saga(saga_id)["state"] == "COMPLETED"
    url = f"{server}/dashboard/api/sagas/{saga_id}"
    good = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(timeout=10) as client:
        assert client.post(f"{url}/cancel").status_code == 401
        assert client.post(f"{url}/cancel", headers={"Authorization": "Bearer x"}
                           ).status_code == 403
        assert client.post(f"{url}/cancel", params={"token": TOKEN}).status_code == 401, \
            "a token in the URL is not a token"
        for evil in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                     {"Sec-Fetch-Site": "cross-site"},
                     {"Origin": server.replace("127.0.0.1", "localhost")}):
            refused = client.post(f"{url}/cancel", headers={**good, **evil})
            assert refused.status_code == 403 and "cross-site" in refused.json()["detail"], evil
        # past the checks, the engine decides: a completed saga neither cancels nor retries
        same = {**good, "Origin": server, "Sec-Fetch-Site": "same-origin"}
        for action in ("cancel", "retry"):
            answer = client.post(f"{url}/{action}", headers=same)
            assert answer.status_code == 409, answer.text
        assert client.post(f"{server}/dashboard/api/sagas/nope/retry", headers=same
                           ).status_code == 404
        assert client.get(f"{url}/cancel").status_code in (404, 405)


# --- the list ----------------------------------------------------------------------------------
def test_the_list_shows_age_and_duration_and_filters_by_saga_and_stalled(
    engine_backend: Backend, server: str, browser: Any
):
    stalled = saga_of("stalled")
    parked = saga_of("parked")
    browser.set_window_size(1400, 900)
    browser.get(f"{server}/dashboard/")

    def rows() -> list[dict[str, str]]:
        return js(browser, """return [...document.querySelectorAll('tr[data-saga-id]')].map(r =>
            ({id: r.dataset.sagaId, stalled: r.dataset.stalled, saga: r.cells[1].textContent,
              version: r.querySelector('.version').textContent,
              age: r.querySelector('.age').textContent,
              duration: r.querySelector('.duration').textContent}))""")

    shown = wait_until(lambda: {r["id"]: r for r in rows()}
                       if {stalled, parked} <= {r["id"] for r in rows()} else None,
                       what="both sagas listed")
    span = re.compile(r"^\d+(\.\d)? (ms|s)$|^\d+ (min|h|d)( \d+ (s|min|h))?$")
    for row in shown.values():
        assert span.match(row["age"]) and span.match(row["duration"]), row
    assert shown[stalled]["stalled"] == "true" and shown[parked]["stalled"] == "false"

    browser.find_element("id", "stalled-filter").click()
    only = wait_until(lambda: (lambda r: r if r and all(x["stalled"] == "true" for x in r)
                               else None)(rows()), what="only stalled sagas")
    assert stalled in {r["id"] for r in only} and "stalled=true" in browser.current_url
    browser.find_element("id", "stalled-filter").click()

    names = js(browser, "return [...document.getElementById('name-filter').options]"
                        ".map(o => o.value)")
    assert {"t_linear", "t_diamond", "t_recovery_unit"} <= set(names)
    js(browser, "const f = document.getElementById('name-filter'); f.value = 't_linear';"
                "f.dispatchEvent(new Event('change'))")
    linear = wait_until(lambda: (lambda r: r if r and {x["saga"] for x in r} == {"t_linear"}
                                 else None)(rows()), what="only t_linear sagas")
    assert parked in {r["id"] for r in linear}
    assert "name=t_linear" in browser.current_url
    assert {r["version"] for r in linear} == {"v1"}
    js(browser, "const v = document.getElementById('version-filter'); v.value = '2';"
                "v.dispatchEvent(new Event('change'))")
    wait_until(lambda: rows() == [] or None, what="no t_linear saga on version 2")
    assert "version=2" in browser.current_url
    js(browser, "const v = document.getElementById('version-filter'); v.value = '1';"
                "v.dispatchEvent(new Event('change'))")
    wait_until(lambda: parked in {r["id"] for r in rows()} or None, what="version 1 again")
    screenshot(browser, "dashboard-list-1400.png", 1400)
    assert console_errors(browser) == []


def test_an_unknown_saga_has_a_readable_404_page(
    engine_backend: Backend, server: str, browser: Any
):
    answer = httpx.get(f"{server}/dashboard/sagas/no-such-saga", timeout=10)
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{server}/dashboard/api/sagas/no-such-saga", timeout=10).status_code == 404
    browser.set_window_size(800, 900)
    browser.get(f"{server}/dashboard/sagas/no-such-<script>saga")
    assert browser.find_element("tag name", "h1").text == "No saga with this id"
    assert browser.find_element("css selector", ".not-found code").text == "no-such-<script>saga"
    assert browser.find_element("link text", "Back to the list of sagas")
    assert not browser.find_elements("id", "graph"), "no empty sections"
    screenshot(browser, "dashboard-404-800.png", 800)
    assert [e for e in console_errors(browser) if "404" not in e] == []
