"""The decider's answers with each principal's remembered rights per channel
(``Principal.granted_rights``): the same as matching every grant on every question,
warm or cold, whatever the settings, and bounded per principal."""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools

import pytest
from django.test import override_settings

from accounts.permissions import (
    MAX_REMEMBERED_CHANNELS,
    can_publish,
    can_see_presence,
    can_subscribe,
)
from accounts.principals import ANONYMOUS, Grant, Principal

GRANTS = (
    Grant("ticker:*", subscribe=False, publish=True, presence=False),
    Grant("private-room-*", subscribe=True, publish=True, presence=False),
    Grant("presence-lobby", subscribe=True, publish=False, presence=True),
    Grant("user:*", subscribe=False, publish=True, presence=False),
    Grant("news?", subscribe=True, publish=False, presence=False),
    Grant("nothing-*", subscribe=False, publish=False, presence=False),
)
PRINCIPALS = [
    ANONYMOUS,
    Principal(kind="user", id=7, name="alice"),
    Principal(kind="user", id=7, name="alice", grants=GRANTS),
    Principal(kind="user", id=8, name="staff", is_staff=True),
    Principal(kind="service", id=1, name="feed"),
    Principal(kind="service", id=1, name="feed", grants=GRANTS[:1]),
    Principal(kind="service", id=2, name="all", grants=GRANTS),
]
CHANNELS = [
    "news",
    "news1",
    "ticker:ACME",
    "TICKER:acme",
    "private-room-1",
    "Private-room-1",
    "private-other",
    "presence-lobby",
    "presence-hall",
    "user:7",
    "user:07",
    "USER:7",
    "user:8",
    "nothing-here",
]


# ----- the rules, matching every grant on every question (the decider before it remembered)


def _reference_granted(principal: Principal, channel: str, right: str) -> bool:
    return any(
        getattr(grant, right) and fnmatch.fnmatchcase(channel, grant.pattern)
        for grant in principal.grants
    )


def _reference_subscribe(principal: Principal, channel: str, *, anonymous_subscribe: bool) -> bool:
    if principal.is_staff:
        return True
    if channel.lower().startswith("user:"):
        return principal.kind == "user" and channel == f"user:{principal.id}"
    if principal.kind == "service":
        return _reference_granted(principal, channel, "subscribe")
    if not channel.lower().startswith(("private-", "presence-", "user:")):
        return principal.is_authenticated or anonymous_subscribe
    return _reference_granted(principal, channel, "subscribe")


def _reference_publish(principal: Principal, channel: str, *, users_publish: bool) -> bool:
    if principal.is_staff:
        return True
    if not principal.is_authenticated:
        return False
    if channel.lower().startswith("user:"):
        return principal.kind == "service" and _reference_granted(principal, channel, "publish")
    public = not channel.lower().startswith(("private-", "presence-", "user:"))
    if principal.kind == "user" and public and users_publish:
        return True
    return _reference_granted(principal, channel, "publish")


def _reference_presence(principal: Principal, channel: str, *, anonymous_subscribe: bool) -> bool:
    if principal.is_staff:
        return True
    subscribe = _reference_subscribe(principal, channel, anonymous_subscribe=anonymous_subscribe)
    return subscribe and _reference_granted(principal, channel, "presence")


# ----- the decider ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("users_publish", "anonymous_subscribe"), list(itertools.product((True, False), repeat=2))
)
def test_remembered_answers_are_the_rules_answers(
    users_publish: bool, anonymous_subscribe: bool
) -> None:
    """Asked twice (the second answer remembered), under each setting the rules read
    outside the grants: a setting changed under a principal still counts at once."""
    with override_settings(
        PUSH={"USERS_PUBLISH": users_publish, "ANONYMOUS_SUBSCRIBE": anonymous_subscribe}
    ):
        for principal, channel, _ in itertools.product(PRINCIPALS, CHANNELS, range(2)):
            where = (principal.kind, principal.grants, channel)
            expected = _reference_publish(principal, channel, users_publish=users_publish)
            assert can_publish(principal, channel) is expected, where
            expected = _reference_subscribe(
                principal, channel, anonymous_subscribe=anonymous_subscribe
            )
            assert can_subscribe(principal, channel) is expected, where
            expected = _reference_presence(
                principal, channel, anonymous_subscribe=anonymous_subscribe
            )
            assert can_see_presence(principal, channel) is expected, where


def test_a_principal_remembers_a_bounded_number_of_channels() -> None:
    """A client trying ever new names never grows its principal past the bound, and a
    refusal stays a refusal (an acceptance an acceptance) however full it was."""
    service = Principal(kind="service", id=1, name="feed", grants=GRANTS)
    for n in range(MAX_REMEMBERED_CHANNELS * 10):
        assert not can_publish(service, f"spray-{n}")
        assert len(service.granted_rights) <= MAX_REMEMBERED_CHANNELS
        if n % 37 == 0:
            assert can_publish(service, f"ticker:{n}")
            assert not can_subscribe(service, f"ticker:{n}")
            assert can_see_presence(service, "presence-lobby")


def test_principals_without_grants_remember_nothing() -> None:
    """Anonymous (one principal shared by every anonymous client) and grant-less users
    are refused private channels without keeping a name."""
    user = Principal(kind="user", id=7, name="alice")
    for n in range(10):
        assert not can_subscribe(ANONYMOUS, f"private-{n}")
        assert not can_publish(user, f"private-{n}")
    assert ANONYMOUS.granted_rights == {}
    assert user.granted_rights == {}


def test_a_principal_with_other_grants_starts_with_nothing_remembered() -> None:
    granted = Principal(kind="service", id=1, name="feed", grants=GRANTS[:1])
    assert can_publish(granted, "ticker:ACME")
    revoked = dataclasses.replace(granted, grants=())
    assert revoked.granted_rights == {}
    assert not can_publish(revoked, "ticker:ACME")
    assert revoked == dataclasses.replace(granted, grants=())  # not compared
