"""Gap repair's read side: the messages a client missed, from the REST history
(``GET /api/v1/channels/<channel>/messages?since=N``, docs/protocol.md "REST").

REST rather than a second subscribe on the WebSocket: on a drop-oldest channel the
server pushes a replay through the same send queue that just overflowed, so it could
be dropped again; an HTTP read is paced by the client alone. The standard library's
``urllib`` keeps the client at two dependencies; it runs in a thread.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

# The server's largest page (PUSH_HISTORY_PAGE_MAX's default); a smaller server limit
# only means more pages.
HISTORY_PAGE_MAX = 1000
# Where a history read carries the channel's signed subscription token.
SUBSCRIPTION_TOKEN_HEADER = "X-Subscription-Token"  # noqa: S105 (a header name)

# (url, headers, timeout_secs) -> the decoded JSON body; raises OSError (urllib's
# URLError and HTTPError included) or ValueError.
GetJson = Callable[[str, dict[str, str], float], Any]


def api_url_for(ws_url: str) -> str:
    """The REST root next to a WebSocket URL: ``ws://host/ws/`` -> ``http://host/api/v1/``
    (the JavaScript client's rule)."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    path = re.sub(r"(^|/)ws/?$", r"\1", parts.path)
    if not path.endswith("/"):
        path += "/"
    return urlunsplit((scheme, parts.netloc, path + "api/v1/", "", ""))


def get_json(url: str, headers: dict[str, str], timeout_secs: float) -> Any:
    # No proxy from the environment, as for the WebSocket: the client talks to the
    # server directly.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (an http(s) URL of ours)
    with opener.open(request, timeout=timeout_secs) as response:
        return json.load(response)


def retry_after_secs(refusal: object) -> float:
    """The ``Retry-After`` of a refusal (429, 503) in seconds, 0 without one: a refused
    read's ``HTTPError``, or a refused handshake's response."""
    headers = getattr(refusal, "headers", None)
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (AttributeError, TypeError, ValueError):
        return 0.0


def fetch_page(
    get: GetJson,
    api_url: str,
    channel: str,
    *,
    after: int,
    until: int,
    token: str | None,
    timeout_secs: float,
    subscription_token: str | None = None,
) -> list[dict[str, Any]]:
    """The first page of stored messages of ``channel`` after ``after``, oldest first,
    the ones up to ``until``: empty when nothing is stored in that range (trimmed), or
    when the page does not move on (a cache that ignores the query, a buggy server).

    One page at a time, each delivered before the next is read: a long gap costs the
    memory of one page, not of the whole range. Pages are asked for with our own
    ``since`` rather than the reply's ``next`` URL, whose host a proxy may have
    rewritten.

    ``subscription_token``: the signed subscription token of the channel, which opens
    its history as it opens the subscribe (``X-Subscription-Token``, a header so that it
    stays out of URLs and access logs)."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Token {token}"
    if subscription_token:
        headers[SUBSCRIPTION_TOKEN_HEADER] = subscription_token
    base = f"{api_url}channels/{quote(channel, safe='')}/messages"
    query = urlencode({"since": after, "limit": min(HISTORY_PAGE_MAX, until - after)})
    results = get(f"{base}?{query}", headers, timeout_secs)["results"]
    return [m for m in results if after < m["seq"] <= until]
