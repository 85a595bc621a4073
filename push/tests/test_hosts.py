"""``common.hosts.host_header_allowed`` answers as Django's ``get_host()`` rule does
for the settings in force, also after they change (it keeps what it derived from them
until Django says they changed)."""

from __future__ import annotations

import pytest
from django.http.request import split_domain_port, validate_host
from django.test import override_settings

from common.hosts import MAX_KEPT_HOST_BYTES, allowed_hosts, host_header_allowed

HOSTS = [
    b"example.com",
    b"example.com:8000",
    b"EXAMPLE.com",
    b"api.example.com",
    b"localhost",
    b"app.localhost:8000",
    b"127.0.0.1",
    b"[::1]:443",
    b"evil.example",
    b"",
    b"example.com:",
    b"a" * (MAX_KEPT_HOST_BYTES + 1),
]


def _django_answer(value: bytes) -> bool:
    domain, _port = split_domain_port(value.decode("latin-1"))
    return bool(domain) and validate_host(domain, allowed_hosts())


@pytest.mark.parametrize(
    ("debug", "allowed"),
    [
        (False, ["example.com"]),
        (False, [".example.com"]),
        (True, []),  # Django's localhost names
        (True, ["example.com"]),
        (False, ["*"]),
        (False, []),
    ],
)
def test_the_answer_follows_the_settings_in_force(debug: bool, allowed: list[str]) -> None:
    for value in HOSTS:
        host_header_allowed(value)  # kept for the settings before
    with override_settings(DEBUG=debug, ALLOWED_HOSTS=allowed):
        for value in HOSTS:
            assert host_header_allowed(value) is _django_answer(value), value
    for value in HOSTS:  # and again once they are restored
        assert host_header_allowed(value) is _django_answer(value), value


def test_a_change_of_debug_alone_changes_the_answer() -> None:
    with override_settings(ALLOWED_HOSTS=[], DEBUG=False):
        assert not host_header_allowed(b"localhost")
        with override_settings(DEBUG=True):
            assert host_header_allowed(b"localhost")
        assert not host_header_allowed(b"localhost")
