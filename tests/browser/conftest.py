"""The browser tests' fixtures: the product's web app on loopback, and Debian's headless Chromium.

Both are per module. The server's log records are kept (``server_logs``) so a test can show that
the admin token never reaches a log line.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from config.settings import Settings
from config.web import create_app
from sagas.ops import dashboard
from tests.browser.support import CHROMEDRIVER, CHROMIUM, TOKEN
from tests.support.services import free_port, require_service


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {record.args!r}")


_KEEP = _Keep()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The product's own web app (config.web), served by uvicorn on loopback, access log on."""
    app = create_app(Settings(admin_token=TOKEN))
    # config/web.py hands the dashboard the same check the /sagas routes use.
    assert dashboard.admin_auth(app) is not None
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info",
                                        access_log=True))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    for name in ("", "uvicorn", "uvicorn.access", "uvicorn.error", "sagas"):
        logging.getLogger(name).addHandler(_KEEP)
    yield f"http://127.0.0.1:{port}"
    for name in ("", "uvicorn", "uvicorn.access", "uvicorn.error", "sagas"):
        logging.getLogger(name).removeHandler(_KEEP)
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def server_logs() -> list[str]:
    """Every log line the server process wrote during the test."""
    _KEEP.lines.clear()
    return _KEEP.lines


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_service(os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER),
                    "Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 "--hide-scrollbars", "--force-device-scale-factor=1",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
