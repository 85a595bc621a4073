"""Awaitable forms of the services, for the consumers: each runs its ORM work on the
database threads (``push.db``)."""

from __future__ import annotations

from push.db import db_call
from push.services import message_publish

message_publish_async = db_call(message_publish)
