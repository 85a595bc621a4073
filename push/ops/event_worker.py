"""The event worker: reads lifecycle events from the stream with a consumer group and
runs the handlers (``PUSH_EVENT_HANDLERS``, plus the webhook sender when
``PUSH_WEBHOOK_URLS`` is set, plus Pusher's webhooks when a Pusher app has webhook
URLs, plus any ``register_handler``).

An entry is acknowledged only after every handler succeeded. A worker that dies leaves
its entries pending; any worker claims entries idle for ``PUSH_EVENT_RETRY_SECS``
(XAUTOCLAIM) and runs them again, so handlers see each event at least once (dedupe by
the event's ``id``). An entry whose handling failed is retried with exponential backoff:
first after about ``PUSH_EVENT_RETRY_SECS``, then twice as long each time (at most
five minutes, ``push.ops.retries``), each delay drawn between half and all of that, so
the events a receiver refused together do not all come back at once. Its due time is kept in
``<stream>:retry:<entry id>``; one claimed before it is left pending again, its
attempts as they were. While a worker works through a batch it keeps the rest of the
batch its own (their idle time restarts), so a long batch is not taken over by another
worker and handled twice. Up to ``PUSH_EVENT_CONCURRENCY`` entries of a batch are
handled at once (handlers run on several threads, so one slow webhook receiver does not
hold up the events behind it), except that the events of one connection, or of one
channel's occupancy, run one after the other in stream order. An entry that failed
``PUSH_EVENT_MAX_ATTEMPTS`` times, or whose next retry would come later than
``PUSH_EVENT_RETRY_TOTAL_SECS`` after its first failure, moves to the dead-letter stream
``<prefix>:events:dead``, shown in the admin.

Each stream entry names the one before it of its connection (or channel), ``after``
(``push.ops.events``): while that one is pending (in another worker's hand, its
receiver slow; in a killed worker's; failed, waiting for its retry) a worker holds the
later one back as behind a failed event, below. Two workers, one with a channel's
``channel_occupied`` in hand and the other reading its ``channel_vacated``, delivered
the vacated first, and the receiver took the channel for occupied for good. Handlers
get each event with its entry id, ``stream_id``: the order they are given in.

An event that failed holds back the later events of its connection (or channel) until
it is handled or dead-lettered, whichever worker reads them: it is named in
``<stream>:waiting:<connection or channel>``, and a later event of the same one is
left pending to be claimed with it, in stream order, without spending an attempt. An
event waits so at most twice the retries' span (``retry_span_secs``) plus the retry
delay after it was added.

A worker told to stop (SIGTERM) finishes the events in hand and leaves the rest of its
batch pending, for another worker to claim at once (a batch of slow webhooks would
outlast the grace a platform gives before it kills the process); their connections'
(or channels') later events wait for them, as behind a failed one.

Each event is handled as Django handles a request: the database connection a handler
used goes back to the pool afterwards, so a restarted PostgreSQL costs the events
handled while it was away (retried), not every later one.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

from django.db import close_old_connections
from django.utils.module_loading import import_string

from common import metrics
from push.ops.events import event_about
from push.ops.retries import retry_delay_secs, retry_span_secs

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], None]
DEFAULT_GROUP = "push-handlers"
BATCH = 100
BLOCK_MS = 1000
# The newest dead letters kept: each holds its event, a client event's 10 KB of data
# among them, and the 100,000 once kept were up to a gigabyte of Redis when a receiver
# refused every event for a day. The admin shows the newest 100.
DEAD_LETTERS_KEPT = 10_000

_registered: list[Handler] = []
# KEYS: a connection's (or channel's) waiting key. ARGV: the event it waits for.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
PUSHER_WEBHOOK_HANDLERS = "push.services.pusher_webhooks.pusher_webhook_handlers"


def register_handler(handler: Handler) -> Handler:
    """Run ``handler(event)`` for every lifecycle event (usable as a decorator)."""
    _registered.append(handler)
    return handler


def configured_handlers() -> list[Handler]:
    from common.conf import push_settings

    handlers = [_configured_handler(path) for path in push_settings.EVENT_HANDLERS]
    if push_settings.WEBHOOK_URLS:
        from push.ops.webhooks import deliver_webhooks

        handlers.append(deliver_webhooks)
    # Pusher's webhooks, when an app has URLs: a service (it reads the apps), named by
    # its path because ops sits below the services and imports none of them.
    handlers.extend(import_string(PUSHER_WEBHOOK_HANDLERS)())
    return handlers + _registered


def _configured_handler(path: str) -> Handler:
    from common.conf import ImproperlyConfiguredEnv

    try:
        return import_string(path)
    except ImportError as exc:
        raise ImproperlyConfiguredEnv(f"PUSH_EVENT_HANDLERS: {path!r}: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class EventWorker:
    def __init__(
        self,
        redis: Any,
        *,
        stream: str,
        group: str,
        consumer: str,
        handlers: list[Handler],
        max_attempts: int,
        retry_idle_ms: int,
        retry_total_ms: int | None = None,
        concurrency: int = 1,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.dead_stream = f"{stream}:dead"
        self.group = group
        self.consumer = consumer
        self.handlers = handlers
        self.max_attempts = max_attempts
        self.retry_idle_ms = retry_idle_ms
        self.retry_total_ms = retry_total_ms
        self.concurrency = max(concurrency, 1)
        self._stop: Callable[[], bool] = lambda: False
        # Where XAUTOCLAIM goes on in the pending list: from its start every time, it
        # saw only the first BATCH x 10 entries, and failed events waiting past those
        # were never claimed while the first ones kept failing.
        self._claim_from = "0-0"
        # When the batch in hand was last claimed again (``_keep_ours``).
        self._refreshed = time.monotonic()
        # The entries of the batch in hand this worker handled: the one before an entry
        # among them needs no look at the pending list (``_befores``).
        self._acked: set[str] = set()
        # How long a failed event holds back those behind it, renewed at each failure:
        # its longest wait and a few retry delays (a worker that died with it, another's
        # busy batch), so that a lost name (a worker killed between acknowledging and
        # releasing) frees them.
        self._waiting_ms = retry_idle_ms * 6 + int(self._delay_ms(max_attempts))
        self._release = redis.register_script(_RELEASE)
        # Handlers run on these threads, even one at a time: the worker's own thread
        # keeps the events in hand claimed meanwhile (``_run_chunk``).
        self._pool = ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="push-events"
        )

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: another worker made it first
            if "BUSYGROUP" not in str(exc):
                raise

    def _try_ensure_group(self) -> None:
        try:
            self.ensure_group()
        except Exception as exc:
            logger.warning("event worker could not create its group: %s", exc)

    def step(self) -> int:
        """Handle what others left pending, then new entries; returns how many."""
        cursor, claimed, *trimmed = self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            self.retry_idle_ms,
            self._claim_from,
            count=BATCH,
        )
        self._claim_from = _text(cursor)  # 0-0 again once it reached the end
        if trimmed and trimmed[0]:  # Redis 7 drops those from the pending list itself
            self._trimmed(len(trimmed[0]))
        handled = self._handle_batch(self._due(claimed))
        if self._stop():
            return handled
        reply = self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=BATCH, block=BLOCK_MS
        )
        for _, entries in reply or []:
            handled += self._handle_batch(entries)
        return handled

    def _handle_batch(self, entries: list[tuple[Any, dict[Any, Any]]]) -> int:
        """Handle entries, ``concurrency`` at a time, those of one connection (or one
        channel's occupancy) in stream order. Every third of the retry delay the
        entries not yet handled, and those in hand, are claimed again: at 20 ms a
        handler, 100 entries outlast a 1 s delay, and a slow webhook receiver (three
        attempts of up to 10 s) holds one event longer than the 10 s default; another
        worker would claim them as abandoned and run them twice."""
        handled = 0
        remaining = list(entries)
        self._refreshed = time.monotonic()
        self._acked.clear()
        while remaining and not self._stop():
            remaining = self._keep_ours(remaining, [])
            if not remaining:
                break
            chunk, remaining = remaining[: self.concurrency], remaining[self.concurrency :]
            handled, remaining = self._run_chunk(chunk, remaining, handled)
        if remaining and self._stop():
            self._leave_to_others(remaining)
        return handled

    def _leave_to_others(self, entries: list[tuple[Any, dict[Any, Any]]]) -> None:
        """A stopping worker's unhandled ``entries``: any worker may claim them at once,
        and each connection's (or channel's) first of them is what its later events wait
        for. Left pending for the retry delay, they were overtaken by those later events
        (a disconnect sent before the subscribe) that another worker read meanwhile."""
        for group in _in_order_groups(entries):
            about = _about(group[0][1])
            if about is not None:
                first = _text(group[0][0])
                self.redis.set(self._waiting_key(about), first, nx=True, px=self._waiting_ms)
        ids = [entry_id for entry_id, _ in entries]
        self.redis.xclaim(
            self.stream, self.group, self.consumer, 0, ids, idle=self.retry_idle_ms, justid=True
        )

    def _run_chunk(
        self,
        chunk: list[tuple[Any, dict[Any, Any]]],
        remaining: list[tuple[Any, dict[Any, Any]]],
        handled: int,
    ) -> tuple[int, list[tuple[Any, dict[Any, Any]]]]:
        """Run ``chunk`` on the handler threads, keeping it and ``remaining`` claimed
        while it runs; returns the count handled and what is left of ``remaining``."""
        waiting = self._waiting_for(chunk)
        futures = [
            self._pool.submit(self._handle_in_order, group, waiting)
            for group in _in_order_groups(chunk)
        ]
        while futures_wait(futures, timeout=self.retry_idle_ms / 3000).not_done:
            remaining = self._keep_ours(remaining, chunk)
        return handled + sum(future.result() for future in futures), remaining

    def _keep_ours(
        self,
        remaining: list[tuple[Any, dict[Any, Any]]],
        in_hand: list[tuple[Any, dict[Any, Any]]],
    ) -> list[tuple[Any, dict[Any, Any]]]:
        """Claim ``remaining`` and ``in_hand`` again when a third of the retry delay has
        passed since they last were; returns those of ``remaining`` still ours."""
        idle_ms = (time.monotonic() - self._refreshed) * 1000
        if idle_ms < self.retry_idle_ms / 3:
            return remaining
        kept = self._still_ours(remaining + in_hand, idle_ms)
        self._refreshed = time.monotonic()
        ours = {_text(entry_id) for entry_id, _ in kept}
        return [entry for entry in remaining if _text(entry[0]) in ours]

    def _retry_key(self, entry_id: Any) -> str:
        return f"{self.stream}:retry:{_text(entry_id)}"

    def _delay_ms(self, attempts: int) -> float:
        return retry_delay_secs(attempts, self.retry_idle_ms / 1000) * 1000

    def _due(self, claimed: list[tuple[Any, dict[Any, Any]]]) -> list[tuple[Any, dict[Any, Any]]]:
        """Those of ``claimed`` whose retry is due; the others are left pending again,
        to be claimed when it is (or after the retry delay, to look again)."""
        if not claimed:
            return []
        due_at = self.redis.mget([self._retry_key(entry_id) for entry_id, _ in claimed])
        now_ms = time.time() * 1000
        due = []
        for entry, at in zip(claimed, due_at, strict=True):
            if at is None or float(at) <= now_ms:
                due.append(entry)
            else:
                self._retry_later(entry[0], float(at) - now_ms, claimed=True)
        return due

    def _retry_later(self, entry_id: Any, wait_ms: float, *, claimed: bool) -> None:
        """Leave ``entry_id`` pending so that it is claimed in ``wait_ms`` (or in the
        retry delay, when that is shorter, to look again), its attempts as they were
        before it was ``claimed`` once more."""
        pending = self._pending(entry_id)
        if pending is None:
            return
        attempts = pending["times_delivered"] - (1 if claimed else 0)
        self.redis.xclaim(
            self.stream,
            self.group,
            self.consumer,
            0,
            [entry_id],
            idle=max(int(self.retry_idle_ms - wait_ms), 0),
            retrycount=max(attempts, 0),
            justid=True,
        )

    def _waiting_key(self, about: str) -> str:
        return f"{self.stream}:waiting:{about}"

    def _waiting_for(self, entries: list[tuple[Any, dict[Any, Any]]]) -> dict[str, str | None]:
        """The event each of these entries' connections (or channels) waits for: a failed
        one, or else the one before the first of them here while it is still pending,
        in another worker's hand (read in an earlier batch, its receiver slow)."""
        abouts = list({about for _, fields in entries if (about := _about(fields))})
        if not abouts:
            return {}
        firsts = self.redis.mget([self._waiting_key(about) for about in abouts])
        found = zip(abouts, firsts, strict=True)
        waiting = {about: _text(first) if first else None for about, first in found}
        befores = {a: b for a, b in self._befores(entries).items() if waiting.get(a) is None}
        if befores:
            with self.redis.pipeline(transaction=False) as pipe:
                for before in befores.values():
                    pipe.xpending_range(self.stream, self.group, min=before, max=before, count=1)
                pending = pipe.execute()
            for (about, before), still in zip(befores.items(), pending, strict=True):
                if still:
                    waiting[about] = before
        return waiting

    def _befores(self, entries: list[tuple[Any, dict[Any, Any]]]) -> dict[str, str]:
        """Per connection (or channel), the entry before the first of ``entries``, where
        it is not among them and this worker has not handled it since its batch began."""
        befores: dict[str, str] = {}
        ids = {_text(entry_id) for entry_id, _ in entries}
        seen: set[str] = set()
        for _, fields in entries:
            about = _about(fields)
            if about is None or about in seen:
                continue
            seen.add(about)
            before = _after(fields)
            if before is not None and before not in ids and before not in self._acked:
                befores[about] = before
        return befores

    def _handle_in_order(
        self, entries: list[tuple[Any, dict[Any, Any]]], waiting: dict[str, str | None]
    ) -> int:
        """Handle ``entries`` one after the other; one whose connection (or channel) waits
        for a failed event is held back, and one that fails holds back those after it.
        ``waiting`` is shared by the groups, each of which writes only its own keys."""
        handled = 0
        for entry_id, fields in entries:
            about, this = _about(fields), _text(entry_id)
            if about is None:  # nothing to keep in order with
                handled += self._handle(entry_id, fields)
                continue
            key, first = self._waiting_key(about), waiting.get(about)
            if first is not None and first != this:
                if self._waited_enough(this):
                    handled += self._handle(entry_id, fields)  # out of order, if it must
                    continue
                if self._hold(entry_id, first):
                    continue
                self._release(keys=[key], args=[first])
                first = waiting[about] = None
            done = self._handle(entry_id, fields)
            handled += done
            if first is None:
                if not done and self._pending(entry_id):  # failed, to be retried
                    self.redis.set(key, this, nx=True, px=self._waiting_ms)
                    waiting[about] = _text(self.redis.get(key)) or None
            elif done or not self._pending(entry_id):  # handled, or dead-lettered
                self._release(keys=[key], args=[this])
                waiting[about] = None
            else:  # failed again: the events behind it go on waiting
                self.redis.pexpire(key, self._waiting_ms)
        return handled

    def _waited_enough(self, entry_id: str) -> bool:
        """Whether ``entry_id`` was added so long ago that it goes now, whatever waits
        before it: as long as a failed event takes to be dead-lettered (twice, for
        room). A receiver that refuses everything (a dead URL among several) then
        delays the events of each connection by that much, not by that much for every
        event before them."""
        added_ms = int(entry_id.split("-", 1)[0])  # an entry id is its XADD time in ms
        return time.time() * 1000 - added_ms > self._retries_ms() * 2

    def _retries_ms(self) -> float:
        """The longest a failed event is retried, and a retry delay for its claim."""
        total_secs = None if self.retry_total_ms is None else self.retry_total_ms / 1000
        span = retry_span_secs(self.max_attempts, self.retry_idle_ms / 1000, total_secs)
        return span * 1000 + self.retry_idle_ms

    def _pending(self, entry_id: Any) -> dict[str, Any] | None:
        found = self.redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        return found[0] if found else None

    def _hold(self, entry_id: Any, first: str) -> bool:
        """Leave ``entry_id`` pending to be claimed with ``first``, the failed event it
        waits for (given the same idle time), its attempts as they were; False when
        ``first`` is no longer pending (handled elsewhere, or trimmed)."""
        waited_for = self._pending(first)
        if waited_for is None:
            return False
        held = self._pending(entry_id)
        self.redis.xclaim(
            self.stream,
            self.group,
            self.consumer,
            0,
            [entry_id],
            idle=waited_for["time_since_delivered"],
            retrycount=max((held["times_delivered"] if held else 1) - 1, 0),
            justid=True,
        )
        return True

    def _still_ours(
        self, entries: list[tuple[Any, dict[Any, Any]]], idle_ms: float
    ) -> list[tuple[Any, dict[Any, Any]]]:
        """Restart the idle time of those ``entries`` this worker still holds; drop those
        another worker claimed. Ours have been idle ``idle_ms``; one claimed by another
        worker (possible only once ours were idle ``retry_idle_ms``) restarted its idle
        time then, so it is at least ``retry_idle_ms`` younger: half of that tells them
        apart. JUSTID leaves the delivery count, the attempts, alone."""
        min_idle_ms = max(int(idle_ms - self.retry_idle_ms / 2), 0)
        ids = [entry_id for entry_id, _ in entries]
        kept = self.redis.xclaim(
            self.stream, self.group, self.consumer, min_idle_ms, ids, justid=True
        )
        ours = {_text(entry_id) for entry_id in kept}
        return [entry for entry in entries if _text(entry[0]) in ours]

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        self._stop = stop
        self.ensure_group()
        while not stop():
            try:
                self.step()
            except Exception as exc:  # Redis away: wait and go on
                logger.warning("event worker step failed: %s", exc)
                time.sleep(1.0)
                if "NOGROUP" in str(exc):
                    # The stream went with its group (a Redis restarted without
                    # persistence, a deleted key): make them again, or wait forever.
                    self._try_ensure_group()

    def _handle(self, entry_id: Any, fields: dict[Any, Any]) -> int:
        """1 when handled and acknowledged; 0 when it failed (pending for a retry, or
        dead-lettered) or held nothing."""
        if not fields:  # trimmed away while pending (Redis 6.2 claims it so)
            self.redis.xack(self.stream, self.group, entry_id)
            self._trimmed(1)
            return 0
        raw = _text(fields.get(b"event") or fields.get("event") or "{}")
        try:
            # Decoded here, where a failure is the event's alone: raised out of the
            # batch, an entry that is no JSON stopped the worker at every claim of it,
            # before it read anything new, for good.
            self._run_handlers(_received(raw, entry_id))
        except Exception as exc:
            self._failed(entry_id, raw, exc)
            return 0
        self.redis.xack(self.stream, self.group, entry_id)
        self._acked.add(_text(entry_id))
        metrics.EVENTS_PROCESSED.labels("handled").inc()
        return 1

    def _run_handlers(self, event: dict[str, Any]) -> None:
        """Every handler on ``event``, between the database boundaries Django puts around
        a request: nothing else closes a handler thread's connection, which would stay out
        of the pool for good, and once PostgreSQL had ended it (a restart) every later
        event on that thread would fail on it until the worker was restarted."""
        close_old_connections()
        started = time.monotonic()
        try:
            for handler in self.handlers:
                handler(event)
        finally:
            metrics.EVENT_HANDLE_SECONDS.observe(time.monotonic() - started)
            close_old_connections()

    def _trimmed(self, count: int) -> None:
        """Events that waited for a retry so long that the stream, kept to
        ``PUSH_EVENT_STREAM_MAXLEN``, dropped them: lost, so said where it is seen."""
        logger.warning(
            "%d events lost: trimmed from the stream (PUSH_EVENT_STREAM_MAXLEN) while "
            "they waited for a retry",
            count,
        )
        metrics.EVENTS_PROCESSED.labels("trimmed").inc(count)

    def _failed(self, entry_id: Any, raw: str, exc: Exception) -> None:
        pending = self.redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        attempts = pending[0]["times_delivered"] if pending else 1
        logger.warning("event %s failed (attempt %d): %s", _text(entry_id), attempts, exc)
        if self._retried(entry_id, attempts):
            metrics.EVENTS_PROCESSED.labels("retry").inc()
            return  # stays pending; claimed again when its retry is due
        self.redis.xadd(
            self.dead_stream,
            {"event": raw, "error": f"{type(exc).__name__}: {exc}"[:500], "attempts": attempts},
            maxlen=DEAD_LETTERS_KEPT,
            approximate=False,  # one entry trimmed per one added: cheap, and exact
        )
        self.redis.xack(self.stream, self.group, entry_id)
        metrics.EVENTS_PROCESSED.labels("dead").inc()

    def _retried(self, entry_id: Any, attempts: int) -> bool:
        """Schedule the next attempt of an event that failed ``attempts`` times, after
        its backoff with jitter; False when it has had its attempts, or its retries
        would outlast ``retry_total_ms`` since its first failure."""
        if attempts >= self.max_attempts:
            return False
        spent_ms = sum(self._delay_ms(n) for n in range(1, attempts + 1))
        if self.retry_total_ms is not None and spent_ms > self.retry_total_ms:
            return False
        wait_ms = self._delay_ms(attempts) * random.uniform(0.5, 1.0)
        due_ms = time.time() * 1000 + wait_ms
        self.redis.set(self._retry_key(entry_id), repr(due_ms), px=int(wait_ms) + self._waiting_ms)
        self._retry_later(entry_id, wait_ms, claimed=False)
        return True


def _in_order_groups(
    entries: list[tuple[Any, dict[Any, Any]]],
) -> list[list[tuple[Any, dict[Any, Any]]]]:
    """``entries`` grouped by what they are about, each group in stream order: a
    receiver sees a connection's connect before its subscribe and its disconnect, and a
    channel's occupied before its vacated, while other connections' events run beside."""
    groups: dict[str, list[tuple[Any, dict[Any, Any]]]] = {}
    for entry_id, fields in entries:
        about = _about(fields) or _text(entry_id)
        groups.setdefault(about, []).append((entry_id, fields))
    return list(groups.values())


def _about(fields: dict[Any, Any]) -> str | None:
    """The connection (or channel) whose events an entry's must follow in order."""
    try:
        event = json.loads(_text(fields.get(b"event") or fields.get("event") or "{}"))
    except ValueError:
        return None
    return event_about(event) if isinstance(event, dict) else None


def _received(raw: str, entry_id: Any) -> Any:
    """The event as handlers get it: with its place in the stream (``stream_id``), the
    order of the events of one connection (or channel) that a receiver can check."""
    received = json.loads(raw)
    if isinstance(received, dict):
        received["stream_id"] = _text(entry_id)
    return received


def _after(fields: dict[Any, Any]) -> str | None:
    """The entry before this one of its connection (or channel), as its node wrote it."""
    after = fields.get(b"after") or fields.get("after")
    return _text(after) if after else None


def dead_letters(redis: Any, stream: str, count: int = 100) -> list[dict[str, Any]]:
    """The newest entries of the dead-letter stream (admin)."""
    rows = []
    for entry_id, fields in redis.xrevrange(f"{stream}:dead", count=count):
        decoded = {_text(k): _text(v) for k, v in fields.items()}
        rows.append({"id": _text(entry_id), **decoded})
    return rows
