"""The REST API's JSON parser: DRF's, except that a body nested too deeply for Python's
json module (which raises RecursionError, not ValueError) is a 400 ``INVALID_JSON``
like any other unparseable body, not a server error."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError("JSON parse error - nested too deeply") from exc
