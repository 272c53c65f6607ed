"""The dashboard in real headless Chromium (Debian's package), against real workers."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from tests.browser.support import ARTIFACTS, console_errors, js, wait_until
from tests.conftest import Backend, wait_for_saga
from tests.support import test_sagas as ts
from tests.support.engine import start_saga

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("backend", ["sqlite"], indirect=True),  # one browser run is enough
]


def test_list_page_counts_filters_and_searches_sagas(
    engine_backend: Backend, server: str, browser: Any
):
    done = start_saga(ts.linear, {})
    undone = start_saga(ts.linear, {"plan": {"b": {"fail": True}}})
    wait_for_saga(done)
    wait_for_saga(undone)
    browser.get(f"{server}/dashboard/")
    wait_until(lambda: js(browser, "return document.querySelectorAll('tr[data-saga-id]').length"),
               what="saga rows")
    counts = js(browser, """return Object.fromEntries([...document.querySelectorAll(
        '#counts .count')].map(c => [c.dataset.state, +c.querySelector('b').textContent]))""")
    assert counts["COMPLETED"] >= 1 and counts["COMPENSATED"] >= 1

    js(browser, "const f=document.getElementById('state-filter'); f.value='COMPENSATED';"
                "f.dispatchEvent(new Event('change'))")
    shown = wait_until(lambda: (lambda s: s if s and set(s) == {"COMPENSATED"} else None)(
        js(browser, "return [...document.querySelectorAll('tr[data-saga-id] .badge')]"
                    ".map(b => b.dataset.state)")), what="only compensated sagas")
    assert shown

    js(browser, "const f=document.getElementById('state-filter'); f.value='';"
                "f.dispatchEvent(new Event('change'))")
    browser.find_element("id", "search").send_keys(done[:13])
    wait_until(lambda: js(browser, "return [...document.querySelectorAll('tr[data-saga-id]')]"
                                   ".map(r => r.dataset.sagaId)") == [done], what="search hit")
    assert console_errors(browser) == []


def test_a_running_sagas_page_shows_its_steps_changing_state_live(
    engine_backend: Backend, server: str, browser: Any
):
    saga_id = start_saga(ts.linear, {"plan": {"b": {"sleep": 2.5}}})
    browser.get(f"{server}/dashboard/sagas/{saga_id}")

    def states() -> dict[str, str]:
        return js(browser, """return Object.fromEntries([...document.querySelectorAll(
            '#graph g.node')].map(g => [g.dataset.step, g.dataset.state]))""")

    running = wait_until(lambda: (lambda s: s if s.get("b") == "RUNNING" else None)(states()),
                         what="step b running")
    assert running["a"] == "SUCCEEDED" and running["d"] == "PENDING"
    finished = wait_until(
        lambda: (lambda s: s if set(s.values()) == {"SUCCEEDED"} else None)(states()),
        timeout=30, what="every step succeeded, without a reload")
    assert list(finished) == ["a", "b", "c", "d"]
    wait_until(lambda: js(browser, "return document.querySelector('#saga-state .badge')"
                                   ".dataset.state") == "COMPLETED", what="saga completed")
    fills = js(browser, "return [...document.querySelectorAll('#graph rect.box')]"
                        ".map(r => getComputedStyle(r).fill)")
    assert len(set(fills)) == 1 and fills[0] != "rgb(0, 0, 0)", "coloured by state"
    assert console_errors(browser) == []


def test_a_compensated_sagas_timeline_shows_compensations_newest_first(
    engine_backend: Backend, server: str, browser: Any
):
    saga_id = start_saga(ts.linear, {"plan": {"d": {"fail": True}}})
    assert wait_for_saga(saga_id)["state"] == "COMPENSATED"
    browser.get(f"{server}/dashboard/sagas/{saga_id}")
    rows = wait_until(lambda: js(browser, """return [...document.querySelectorAll(
        '#timeline tr')].map(r => [r.dataset.step, r.dataset.phase, r.dataset.outcome])"""),
        what="timeline rows")
    assert [r[0] for r in rows if r[1] == "compensation"] == ["c", "b", "a"]
    assert ["d", "action", "failed"] in rows
    assert all(o == "compensated" for _, p, o in rows if p == "compensation")
    times = js(browser, """return [...document.querySelectorAll('#timeline tr')]
        .map(r => [r.cells[3].textContent, r.cells[4].textContent])""")
    clock = re.compile(r"^\d{2}:\d{2}:\d{2}[.,]\d{3}$")
    assert all(clock.match(start) and clock.match(end) for start, end in times), times
    assert [start for start, _ in times] == sorted(start for start, _ in times)
    links = js(browser, "return [...document.querySelectorAll('#timeline a')].map(a => a.href)")
    assert f"/task/{saga_id}.c.undo.1" in " ".join(links), "links to each task in Flower"
    graph = js(browser, """return Object.fromEntries([...document.querySelectorAll(
        '#graph g.node')].map(g => [g.dataset.step, g.dataset.state]))""")
    assert graph == {"a": "COMPENSATED", "b": "COMPENSATED", "c": "COMPENSATED", "d": "FAILED"}
    assert '"input"' in browser.find_element("id", "context").text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-compensated-saga.png"))
    assert console_errors(browser) == []


def test_a_waiting_sagas_page_names_the_key_and_links_its_holder(
    engine_backend: Backend, server: str, browser: Any
):
    key = f"account:{uuid.uuid4()}"
    holder = start_saga(ts.locked, {"keys": [key], "plan": {"a": {"sleep": 6}}})
    waiter = start_saga(ts.locked, {"keys": [key]})
    browser.get(f"{server}/dashboard/sagas/{waiter}")
    text = wait_until(lambda: browser.find_element("id", "saga-locks").text or None,
                      what="the lock line")
    assert text == f"Waits for key {key}, held by saga {holder}."
    link = js(browser, "return document.querySelector('#saga-locks a').getAttribute('href')")
    assert link == f"/dashboard/sagas/{holder}"
    assert js(browser, "return document.querySelector('#saga-state .badge')"
                       ".dataset.state") == "WAITING"
    assert browser.find_element("id", "timeline-chart").text == (
        "Nothing has run yet: it waits for a semantic lock.")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-waiting-saga.png"))
    # When the holder ends, the page follows: the waiter runs and completes, holding its key.
    wait_until(lambda: js(browser, "return document.querySelector('#saga-state .badge')"
                                   ".dataset.state") == "COMPLETED", timeout=40,
               what="the waiter completed")
    assert console_errors(browser) == []
