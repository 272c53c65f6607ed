"""Helpers of the browser tests: waiting on the page, running script in it, colour contrast."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TOKEN = "browser-test"

# pictures(): what the dashboard's two SVGs show, measured by the browser: each node with its
# lines, labels outside their box, lines shrunk to fit, every text with its fill and the fill
# behind it, points of edges inside a box, the badges' colours, bars and markers.
PICTURES = r"""
function pictures() {
const nodes = [], overflow = [], squeezed = [], texts = [], crossings = [];
const inside = (b, r, m) => b.x >= r.x + m && b.y >= r.y + m &&
  b.x + b.width <= r.x + r.width - m && b.y + b.height <= r.y + r.height - m;
for (const g of document.querySelectorAll('#graph g.node')) {
  const r = g.querySelector('rect.box').getBBox();
  nodes.push({step: g.dataset.step, state: g.dataset.state, cls: [...g.classList],
              reason: g.dataset.stalledReason || null, x: r.x, y: r.y, w: r.width, h: r.height,
              lines: [...g.querySelectorAll('text')].map(t => t.textContent)});
  for (const t of g.querySelectorAll('text')) {
    const b = t.getBBox();
    if (!inside(b, r, 1)) overflow.push([g.dataset.step, t.textContent,
      [b.x, b.y, b.width, b.height], [r.x, r.y, r.width, r.height]]);
    if (t.dataset.squeezed) squeezed.push(t.textContent);
  }
}
function behind(t) {  // the fill painted last under the middle of t
  const b = t.getBBox(), cx = b.x + b.width / 2, cy = b.y + b.height / 2;
  let fill = null;
  for (const r of t.ownerSVGElement.querySelectorAll('rect')) {
    if (!(r.compareDocumentPosition(t) & Node.DOCUMENT_POSITION_FOLLOWING)) continue;
    const f = getComputedStyle(r).fill;
    if (f === 'none') continue;
    const rb = r.getBBox();
    if (cx >= rb.x && cx <= rb.x + rb.width && cy >= rb.y && cy <= rb.y + rb.height) fill = f;
  }
  return fill;
}
for (const t of document.querySelectorAll('#graph svg text, #timeline-chart svg text')) {
  const b = t.getBBox();
  texts.push({text: t.textContent, fill: getComputedStyle(t).fill, bg: behind(t),
              where: t.closest('#graph') ? 'graph' : 'timeline', at: [b.x, b.y, b.width, b.height],
              svg: t.ownerSVGElement.getAttribute('viewBox'), html: t.outerHTML});
}
const boxes = [...document.querySelectorAll('#graph rect.box')].map(r => r.getBBox());
for (const p of document.querySelectorAll('#graph path.edge')) {
  const length = p.getTotalLength();
  for (let s = 0; s <= length; s += 2) {
    const q = p.getPointAtLength(s);
    for (const r of boxes) if (q.x > r.x + 1 && q.x < r.x + r.width - 1 &&
                              q.y > r.y + 1 && q.y < r.y + r.height - 1)
      crossings.push([p.dataset.from, p.dataset.to, q.x, q.y]);
  }
}
const badges = [...document.querySelectorAll('.badge')].map(b => {
  const s = getComputedStyle(b); return {text: b.textContent, fill: s.color, bg: s.backgroundColor};
});
const collisions = [];  // two texts of the timeline drawn over each other
const labels = [...document.querySelectorAll('#timeline-chart svg text')]
  .map(t => [t, t.getBBox()]);
labels.forEach(([t, a], i) => labels.slice(i + 1).forEach(([u, b]) => {
  if (a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height)
    collisions.push([t.textContent, u.textContent]);
}));
for (const line of document.querySelectorAll('#timeline-chart g.marker line')) {
  const x = +line.getAttribute('x1'), y1 = +line.getAttribute('y1'), y2 = +line.getAttribute('y2');
  for (const t of document.querySelectorAll(
      '#timeline-chart g.marker text, #timeline-chart text.outside')) {
    const b = t.getBBox();
    if (x > b.x && x < b.x + b.width && b.y + b.height > y1 && b.y < y2)
      collisions.push(['a marker line through', t.textContent]);
  }
}
const svg = document.querySelector('#graph svg');
return {
  nodes, overflow, squeezed, texts, crossings, badges, collisions,
  edges: [...document.querySelectorAll('#graph path.edge')]
    .map(p => [p.dataset.from, p.dataset.to]),
  orientation: svg.dataset.orientation,
  graphWidth: svg.getBBox().width, graphRoom: document.getElementById('graph').clientWidth,
  bars: [...document.querySelectorAll('#timeline-chart g.bar')].map(g => [g.dataset.step,
         g.dataset.phase, g.dataset.outcome]),
  markers: [...document.querySelectorAll('#timeline-chart g.marker')].map(g => g.dataset.kind),
  pageWidth: document.documentElement.scrollWidth, viewport: window.innerWidth,
};
}
"""


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait_until(check: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # the page re-renders between polls
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


_RGB = re.compile(r"rgba?\(\s*([\d.]+)[,\s]+([\d.]+)[,\s]+([\d.]+)(?:[,\s/]+([\d.]+))?\s*\)")


def rgb(css: str) -> tuple[float, float, float]:
    """A computed colour (``rgb(r, g, b)``) as numbers; refuses transparency."""
    m = _RGB.fullmatch(css.strip())
    assert m, f"not an rgb() colour: {css!r}"
    assert m.group(4) is None or float(m.group(4)) == 1, f"translucent colour {css!r}"
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def luminance(colour: tuple[float, float, float]) -> float:
    def channel(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two computed CSS colours."""
    la, lb = sorted((luminance(rgb(a)), luminance(rgb(b))), reverse=True)
    return (la + 0.05) / (lb + 0.05)
