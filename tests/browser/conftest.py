"""Headless Chromium for the browser tests: Debian's ``chromium`` driven by its
``chromium-driver`` through Selenium. Nothing is downloaded; without the browser the
tests skip and say which packages to install, except in CI (``CI`` set), where a
missing browser fails them. The session ends by listing the screenshots it saved."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.pages import SAVED_SCREENSHOTS
from tests.servers import ServerNode

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING_BROWSER = (
    "needs Debian's headless browser: apt-get install -y chromium chromium-driver "
    "(/usr/bin/chromium and /usr/bin/chromedriver)"
)
# The flags that let Chromium run as root in a container with no network but loopback:
# no sandbox (root), no GPU, and none of the background fetches that would try the
# internet (component updates, sync, QUIC probing).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives a headless Chromium against real nodes")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SAVED_SCREENSHOTS:
        terminalreporter.write_sep("-", "browser screenshots")
        for path in dict.fromkeys(SAVED_SCREENSHOTS):
            terminalreporter.write_line(str(path))


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        # CI installs them (scripts/ensure_services.sh): missing there is a broken
        # setup, not a machine without a browser.
        if os.environ.get("CI"):
            pytest.fail(MISSING_BROWSER)
        pytest.skip(MISSING_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="push-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # Keep the page's console: a failing test prints it.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page_node(two_nodes: tuple[ServerNode, ServerNode]) -> ServerNode:
    """The node that serves the demo page (and, on the fallback, its stream and REST):
    one of the shared pair (tests/conftest.py)."""
    return two_nodes[0]
