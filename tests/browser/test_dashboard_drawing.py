"""The dashboard's SVG drawing on its own: layout rules in Python, text metrics in Chromium.

No workers here: a saga's view is built by hand, so shapes the sample sagas do not have (a fan-out
of four, a join of three, edges that skip layers, a graph too wide for the page) are drawn, then
measured in headless Chromium with the probe the page tests use.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sagas.definition import Saga, Step
from sagas.ops import dashboard as d
from sagas.runtime.stalls import Stall, StallReason, StepStall
from sagas.settings import SagaSettings
from tests.browser.support import ARTIFACTS, PICTURES, contrast, js

T0 = datetime(2025, 1, 2, 9, 30, tzinfo=UTC)

WIDE = Saga("t_wide_fan_out", steps=[
    Step("receive_customer_order", action="x.receive"),
    Step("reserve_stock_in_berlin", action="x.r1", depends_on=["receive_customer_order"]),
    Step("reserve_stock_in_lyon", action="x.r2", depends_on=["receive_customer_order"]),
    Step("reserve_stock_in_porto", action="x.r3", depends_on=["receive_customer_order"]),
    Step("authorise_payment", action="x.pay", depends_on=["receive_customer_order"]),
    Step("pack_parcels", action="x.pack",
         depends_on=["reserve_stock_in_berlin", "reserve_stock_in_lyon",
                     "reserve_stock_in_porto"]),
    Step("ship_and_notify", action="x.ship", pivot=True,
         depends_on=["pack_parcels", "authorise_payment", "receive_customer_order"]),
])
LONG = Saga("t_long_chain", steps=[
    Step("validate_the_request", action="x.validate"),
    Step("price_every_line_item", action="x.price"),
    Step("apply_loyalty_discount", action="x.discount", depends_on=["price_every_line_item"]),
    Step("check_fraud_signals", action="x.fraud", depends_on=["price_every_line_item"]),
    Step("capture_the_payment", action="x.capture", pivot=True,
         depends_on=["apply_loyalty_discount", "check_fraud_signals"]),
    Step("book_the_courier", action="x.courier"),
    Step("email_the_receipt", action="x.email",
         depends_on=["book_the_courier", "validate_the_request"]),
])
SAGAS = {"wide": WIDE, "long": LONG}
STATES = ["SUCCEEDED", "COMPENSATING", "COMPENSATED", "COMPENSATION_FAILED", "FAILED",
          "SKIPPED", "PENDING"]


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def view_of(saga: Saga, states: list[str], state: str = "COMPENSATING") -> dict[str, Any]:
    steps = [{"name": n, "state": s, "attempts": 2 if i % 2 else 1,
              "compensation_attempts": 3 if s == "COMPENSATION_FAILED" else 0, "error": None,
              "result": None, "started_at": None, "finished_at": None}
             for i, (n, s) in enumerate(zip(saga.order, states, strict=True))]
    first = saga.order[0]
    events = [
        {"id": 1, "step": None, "from_state": "PENDING", "to_state": "RUNNING", "attempt": 0,
         "error": None, "at": at(0)},
        {"id": 2, "step": first, "from_state": "PENDING", "to_state": "RUNNING", "attempt": 1,
         "error": None, "at": at(0)},
        {"id": 3, "step": first, "from_state": "RUNNING", "to_state": "RUNNING", "attempt": 2,
         "error": "re-driven by recovery", "at": at(40)},
        {"id": 4, "step": first, "from_state": "RUNNING", "to_state": "SUCCEEDED", "attempt": 2,
         "error": None, "at": at(41)},
        {"id": 5, "step": None, "from_state": "RUNNING", "to_state": "COMPENSATING",
         "attempt": 0, "error": "cancelled by operator", "at": at(50)},
        {"id": 6, "step": first, "from_state": "SUCCEEDED", "to_state": "COMPENSATING",
         "attempt": 1, "error": None, "at": at(51)},
    ]
    return {"id": "wide-1", "name": saga.name, "state": state, "error": None,
            "created_at": at(0), "updated_at": at(51), "context": {}, "steps": steps,
            "events": events}


def page_html(view: dict[str, Any], saga: Saga, width: int, stall: dict[str, Any] | None
              ) -> tuple[str, str]:
    picture = d.draw_graph(view, saga, stall, width)
    chart = d.draw_timeline(view, d.timeline(view, "http://flower"), T0 + timedelta(seconds=60),
                            width, 0, stall)
    return (f"<div id=graph style='overflow:auto'>{picture.svg}</div>"
            f"<div id=timeline-chart>{chart}</div>", picture.orientation)


# --- in Python ---------------------------------------------------------------------------------
def test_every_state_colour_has_text_contrast_of_at_least_4_5():
    def css(hex_: str) -> str:
        return f"rgb({int(hex_[1:3], 16)}, {int(hex_[3:5], 16)}, {int(hex_[5:7], 16)})"

    paints = [*d.STEP_PAINT.values(), *d.SAGA_PAINT.values(), *d.BAR_PAINT.values()]
    assert all(contrast(css(p.fill), css(p.text)) >= 4.5 for p in paints)
    for ink in [*d.MARKER_INK.values(), d.INK]:  # marker and outside labels on the canvas
        assert contrast(css(ink), css(d.CANVAS)) >= 4.5, ink


@pytest.mark.parametrize("orientation", ["LR", "TB"])
def test_layers_follow_the_longest_path_and_boxes_never_overlap(orientation: str):
    names = list(WIDE.order)
    sizes = {n: (d.text_width(n, d.NAME_PX) + 24, 48.0) for n in names}
    out = d.layout(names, dict(WIDE.parents), sizes, orientation)
    along = (lambda b: b.y + b.h / 2) if orientation == "TB" else (lambda b: b.x + b.w / 2)
    layer = {}
    for n in names:
        layer.setdefault(round(along(out.boxes[n]), 1), []).append(n)
    by_layer = [sorted(v) for _, v in sorted(layer.items())]
    assert by_layer == [
        ["receive_customer_order"],
        ["authorise_payment", "reserve_stock_in_berlin", "reserve_stock_in_lyon",
         "reserve_stock_in_porto"],
        ["pack_parcels"],
        ["ship_and_notify"],
    ]
    for a, b in itertools.combinations(out.boxes.values(), 2):
        apart = (a.x + a.w + 10 <= b.x or b.x + b.w + 10 <= a.x or
                 a.y + a.h + 10 <= b.y or b.y + b.h + 10 <= a.y)
        assert apart, (a, b)
    assert len(out.edges) == 10


def test_fit_keeps_order_and_gaps_and_centres_what_it_can():
    centres = d._fit([0.0, 0.0, 0.0], [40.0, 20.0, 40.0], 10)
    assert centres == pytest.approx([-40.0, 0.0, 40.0])
    assert d._fit([0.0, 100.0], [20.0, 20.0], 10) == pytest.approx([0.0, 100.0])


# --- in Chromium ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "width", "orientation"), [
    ("wide", 1400, "LR"), ("wide", 700, "LR"),  # too wide either way: the narrower, scrolled
    ("long", 1400, "TB"), ("long", 800, "TB"),
])
def test_graphs_in_every_state_keep_labels_in_boxes_and_edges_off_them(
    browser: Any, shape: str, width: int, orientation: str
):
    saga = SAGAS[shape]
    view = view_of(saga, STATES)
    stalled = saga.order[2]  # marked on a box in a crowded layer
    stall = d.stall_of(Stall((StepStall(
        stalled, "action", "q", StallReason.OVERDUE, since=T0 + timedelta(seconds=21), looks=0,
        next_look=T0 + timedelta(seconds=51), time_limit=None),)), SagaSettings())
    assert stall is not None and stall["deadline"] == at(51)
    assert stall["reasons"] == {stalled: "no progress since 09:30:21 UTC; recovery re-drives it"}
    assert stall["reason"].startswith(f"{stalled} made no progress since 09:30:21 UTC")
    html, drawn = page_html(view, saga, width - 16, stall)
    assert drawn == orientation
    browser.set_window_size(width, 900)
    browser.get("about:blank")
    js(browser, "document.body.style.margin = '8px'; document.body.innerHTML = arguments[0]",
       html)
    probe = js(browser, PICTURES + "return pictures();")
    assert {n["state"] for n in probe["nodes"]} == set(STATES)
    assert probe["overflow"] == [] and probe["squeezed"] == []
    assert probe["crossings"] == [], "an edge passes through a node"
    assert probe["collisions"] == [], "timeline labels drawn over each other"
    low = [(t["text"], t["fill"], t["bg"]) for t in probe["texts"]
           if contrast(t["fill"], t["bg"]) < 4.5]
    assert low == []
    nodes = {n["step"]: n for n in probe["nodes"]}
    assert "stalled" in nodes[stalled]["cls"]
    assert [n for n in nodes if "pivot" in nodes[n]["cls"]] == [saga.pivot]
    joins = {n for n in saga.order if len(saga.parents[n]) > 1}
    assert {n for n in nodes if "join" in nodes[n]["cls"]} == joins
    assert {"cancel", "redrive", "stalled"} <= set(probe["markers"])
    assert [saga.order[0], "action", "redriven"] in probe["bars"]
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"dashboard-drawing-{shape}-{width}.png"))
    whole = js(browser, "return document.querySelector('#graph svg').width.baseVal.value")
    if whole > width - 16:  # the picture scrolls: the whole of it too, to look at
        browser.set_window_size(int(whole) + 40, 900)
        browser.save_screenshot(str(ARTIFACTS / f"dashboard-drawing-{shape}-{width}-whole.png"))
