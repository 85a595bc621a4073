"""What the browser tests read off the demo page and how they publish to it: the
page's state, subprotocol and seq list, waits that print the browser console when they
time out, REST publishing from the test, and the screenshots saved on the way."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx

from tests.servers import ROOT, ServerNode

ARTIFACTS = ROOT / "artifacts"
WAIT_SECS = 20.0
# Every screenshot this session saved, for the summary at its end (conftest.py).
SAVED_SCREENSHOTS: list[Path] = []


def wait_for(what: str, check: Callable[[], Any], driver: Any, timeout: float = WAIT_SECS) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    console = "\n".join(str(entry) for entry in driver.get_log("browser"))
    raise AssertionError(f"timed out waiting for {what}; browser console:\n{console}")


def page_state(driver: Any) -> str:
    return driver.find_element("id", "state").get_attribute("data-state")


def page_protocol(driver: Any) -> str:
    return driver.find_element("id", "state").get_attribute("data-protocol") or ""


def page_seqs(driver: Any) -> list[int]:
    text = driver.find_element("id", "feed").get_attribute("data-seqs") or ""
    return [int(seq) for seq in text.split(",") if seq]


def page_record(driver: Any, name: str) -> dict[str, Any]:
    """``window[name]``: what a test's script in the page records as it goes."""
    return cast(dict[str, Any], driver.execute_script(f"return window.{name}"))


def publish_rest(node: ServerNode, token: str, channel: str, data: Any) -> int:
    response = httpx.post(
        f"{node.http_url}/api/v1/channels/{channel}/messages",
        json={"data": data},
        headers={"Authorization": f"Token {token}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return int(response.json()["seq"])


def wait_for_seqs(driver: Any, expected: list[int]) -> None:
    wait_for(f"seqs {expected}", lambda: page_seqs(driver) == expected, driver)


def wait_for_state(driver: Any, state: str) -> None:
    wait_for(f'the state "{state}"', lambda: page_state(driver) == state, driver)


def publish_from_page(driver: Any, text: str) -> None:
    box = driver.find_element("id", "publish-data")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "publish").click()


def save_screenshot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    SAVED_SCREENSHOTS.append(path)
