"""The JavaScript client's own tests (``clients/js/test/``, Node's built-in runner,
fake transports): the SSE fallback policy, cursors and REST publishing, without a
browser or a server. Skipped where Node is not installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.servers import ROOT

JS_CLIENT = ROOT / "clients" / "js"
NODE_TEST_TIMEOUT_SECS = 60


def test_javascript_client_unit_tests_pass() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("needs Node.js 20+ (apt-get install -y nodejs)")
    test_files = sorted(str(path) for path in (JS_CLIENT / "test").glob("*.test.js"))
    result = subprocess.run(
        [node, "--test", *test_files],
        cwd=JS_CLIENT,
        capture_output=True,
        text=True,
        timeout=NODE_TEST_TIMEOUT_SECS,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
