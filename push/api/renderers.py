"""A history page's JSON with each message's data as it was stored.

A message's ``data_json`` is already canonical JSON. DRF's ``JSONRenderer`` would
parse every one back into Python values and encode them again: for a page of 1 MB
messages that is tens of milliseconds of C code holding the GIL, on the event loop
or off it (measured: 9% of the loop's time under the abuse suite, from four clients
reading pages of 1 MB messages). Here the page is written around the stored text, as
the WebSocket's JSON codec writes a ``message`` frame (``JsonCodec.encode_message``),
so the body is the same bytes DRF would have produced. Anything else, and the
browsable API's indented JSON, goes through ``JSONRenderer`` unchanged; the browsable
API shows at most ``BROWSABLE_CONTENT_MAX_CHARS`` of it (``BoundedBrowsableAPIRenderer``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from rest_framework.compat import LONG_SEPARATORS, SHORT_SEPARATORS
from rest_framework.renderers import BaseRenderer, BrowsableAPIRenderer, JSONRenderer

from push.fanout.message import ChannelMessage
from push.wire.codecs import DEFAULT_CODEC as _JSON


class StoredMessages(list[ChannelMessage]):
    """The ``results`` of a page: messages, rendered from their stored JSON."""

    def envelopes(self) -> list[dict[str, Any]]:
        return [message.envelope() for message in self]


def plain(data: Any) -> Any:
    """``data`` with its stored messages as envelopes, for any other renderer."""
    if isinstance(data, Mapping) and isinstance(data.get("results"), StoredMessages):
        return {**data, "results": data["results"].envelopes()}
    return data


# DRF's browsable API shows a response's JSON indented by 4 and passed through Django's
# ``urlize`` filter, word by word. Measured on a node: a page of four messages of
# 340,000 zeros each (2.7 MB of JSON, 20 ms to answer as JSON) became 25.8 MB of HTML,
# took ~1.8 s of CPU and raised the node's RSS by ~450 MB per request, kept after it;
# anyone may ask for it with ``Accept: text/html``. So the page shows this much of the
# response, which a person can read, and says how to get the rest.
BROWSABLE_CONTENT_MAX_CHARS = 64 * 1024


class BoundedBrowsableAPIRenderer(BrowsableAPIRenderer):
    """The browsable API, showing at most ``BROWSABLE_CONTENT_MAX_CHARS`` of a
    response: a larger one is not indented (indenting deeply nested or long arrays
    multiplies their size) and is cut there."""

    def get_content(
        self,
        renderer: BaseRenderer,
        data: Any,
        accepted_media_type: str,
        renderer_context: Mapping[str, Any],
    ) -> str:
        compact = renderer.render(data, accepted_media_type, {**renderer_context, "indent": None})
        if len(compact) <= BROWSABLE_CONTENT_MAX_CHARS:
            content = super().get_content(renderer, data, accepted_media_type, renderer_context)
        else:
            content = compact.decode("utf-8", "replace") if isinstance(compact, bytes) else compact
        if len(content) <= BROWSABLE_CONTENT_MAX_CHARS:
            return content
        return (
            f"{content[:BROWSABLE_CONTENT_MAX_CHARS]}\n\n"
            f"[{len(content) - BROWSABLE_CONTENT_MAX_CHARS} more characters not shown here: "
            "ask with Accept: application/json for the whole response]"
        )


class MessagePageRenderer(JSONRenderer):
    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        context = renderer_context or {}
        if data is None or self.get_indent(accepted_media_type or "", context):
            return super().render(plain(data), accepted_media_type, renderer_context)
        if isinstance(data, Mapping) and isinstance(data.get("results"), StoredMessages):
            rest = {key: value for key, value in data.items() if key != "results"}
            body = _page_text(data["results"], rest)
        else:
            # What JSONRenderer's json.dumps makes without an indent, by an encoder made
            # once: json.dumps builds one per call (a few µs of every REST answer).
            body = _compact_encoder(self).encode(data)
        return javascript_safe(body)


def javascript_safe(body: str) -> bytes:
    """JSON text as JSONRenderer sends it: valid JavaScript as well as JSON."""
    return body.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def _compact_encoder(renderer: JSONRenderer) -> json.JSONEncoder:
    """JSONRenderer's encoder for an answer without an indent, made once per setting."""
    setting = (renderer.encoder_class, renderer.ensure_ascii, renderer.strict, renderer.compact)
    encoder = _compact_encoders.get(setting)
    if encoder is None:
        separators = SHORT_SEPARATORS if renderer.compact else LONG_SEPARATORS
        encoder = _compact_encoders[setting] = renderer.encoder_class(
            ensure_ascii=renderer.ensure_ascii,
            allow_nan=not renderer.strict,
            separators=separators,
        )
    return encoder


_compact_encoders: dict[tuple[Any, ...], json.JSONEncoder] = {}


def _page_text(messages: Iterable[ChannelMessage], rest: dict[str, Any]) -> str:
    results = ",".join(_JSON.encode_message(message) for message in messages)
    others = "".join(
        f",{json.dumps(key)}:{json.dumps(value, ensure_ascii=False, separators=(',', ':'))}"
        for key, value in rest.items()
    )
    return f'{{"results":[{results}]{others}}}'
