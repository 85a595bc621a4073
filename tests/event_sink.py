"""An event handler for the tests: appends each event to a file with the name of the
worker that ran it, slowly if asked, and refuses one event type if asked
(``EVENT_SINK_PATH``, ``EVENT_SINK_WORKER``, ``EVENT_SINK_DELAY``,
``EVENT_SINK_FAIL_TYPE``)."""

from __future__ import annotations

import json
import os
import time
from typing import Any


def record(event: dict[str, Any]) -> None:
    time.sleep(float(os.environ.get("EVENT_SINK_DELAY", "0")))
    if event.get("type") == os.environ.get("EVENT_SINK_FAIL_TYPE"):
        raise RuntimeError("this handler refuses that event type")
    with open(os.environ["EVENT_SINK_PATH"], "a", encoding="utf-8") as sink:
        handled_by = os.environ.get("EVENT_SINK_WORKER", "")
        sink.write(json.dumps({**event, "handled_by": handled_by}) + "\n")
