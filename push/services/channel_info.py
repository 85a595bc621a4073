"""What a channel is right now: its last seq, its subscribers across the cluster and,
on presence channels, how many members it has (``GET /api/v1/channels/<channel>`` and
the channel list). The caller's right to subscribe is checked before (the view's
``ChannelPermission``) or here, per channel, for the list: the same decider as
subscribing."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from accounts.permissions import can_subscribe, is_presence_channel
from accounts.principals import Principal
from common.errors import ErrorCode, PushError
from push.cluster.node import running_node
from push.cluster.occupancy import occupied_channels, subscriber_totals
from push.cluster.presence import presence_counts_sync
from push.storage import recent_store, selectors
from push.storage.history_modes import is_recent

logger = logging.getLogger(__name__)


def _last_seqs(channels: list[str]) -> dict[str, int]:
    recent = [c for c in channels if is_recent(c)]
    latest = selectors.channel_latest_seqs(channels=[c for c in channels if not is_recent(c)])
    if recent:
        try:
            latest.update(recent_store.latest_seqs_sync(recent))
        except Exception as exc:
            raise PushError(ErrorCode.UNAVAILABLE, "recent history is unavailable") from exc
    return latest


def channel_bodies(channels: list[str]) -> list[dict[str, Any]]:
    """``{"channel", "last_seq", "subscribers"}`` for each of ``channels``, and
    ``presence_members`` for presence channels; counted across nodes."""
    node = running_node()
    try:
        totals = subscriber_totals(
            channels, local=node.occupancy.local_count if node is not None else None
        )
    except Exception as exc:
        raise PushError(ErrorCode.UNAVAILABLE, "subscriber counts are unavailable") from exc
    latest = _last_seqs(channels)
    try:
        members = presence_counts_sync(
            [c for c in channels if is_presence_channel(c)],
            local=node.presence if node is not None else None,
        )
    except Exception as exc:
        raise PushError(ErrorCode.UNAVAILABLE, "presence is unavailable") from exc
    bodies = []
    for channel in channels:
        body: dict[str, Any] = {
            "channel": channel,
            "last_seq": latest.get(channel, 0),
            "subscribers": totals[channel],
        }
        if channel in members:
            body["presence_members"] = members[channel]
        bodies.append(body)
    return bodies


def channel_info(*, channel: str) -> dict[str, Any]:
    return channel_bodies([channel])[0]


# A page of the stored channel list looks at most this many names, visible or not, and
# says where it stopped (``next``): the caller's rights are a filter the index cannot
# use (reserved prefixes match regardless of case), so a list with few names the caller
# may see read every stored channel after ``after``. Measured: an anonymous request
# over 500,000 stored ``user:`` channels took PostgreSQL ~0.5 s, and one address may
# send 20 a second. Filtering these names costs the node a few milliseconds.
CHANNEL_LIST_SCAN_MAX = 5000


def channel_names_visible(
    *, principal: Principal, prefix: str, occupied: bool, after: str, limit: int
) -> tuple[list[str], str | None]:
    """Up to ``limit`` names, in order, after ``after``, starting with ``prefix``, of the
    channels ``principal`` may subscribe to: the stored channels, or with ``occupied``
    those with a subscriber on some node now (recent-only channels included). With
    them the last name looked at when the stored list stopped looking before its end
    (``CHANNEL_LIST_SCAN_MAX``), else None: the next page starts after it."""
    if not occupied:
        stored = selectors.channel_list().filter(name__startswith=prefix, name__gt=after)
        scanned = list(stored.values_list("name", flat=True)[:CHANNEL_LIST_SCAN_MAX])
        cut = scanned[-1] if len(scanned) == CHANNEL_LIST_SCAN_MAX else None
        return _visible(principal, scanned, limit), cut
    node = running_node()
    try:
        names = sorted(occupied_channels(prefix, local=node.hub if node is not None else None))
    except Exception as exc:
        raise PushError(ErrorCode.UNAVAILABLE, "subscriber counts are unavailable") from exc
    return _visible(principal, (n for n in names if n > after), limit), None


def _visible(principal: Principal, names: Iterable[str], limit: int) -> list[str]:
    """The first ``limit`` of ``names`` that ``principal`` may subscribe to."""
    visible = (n for n in names if can_subscribe(principal, n))
    return [name for name, _ in zip(visible, range(limit), strict=False)]
