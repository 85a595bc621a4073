"""How the Redis settings become clients: a URL, or Sentinel plus the URL's database
and password (the failover itself is shown in tests/faults/test_redis_sentinel.py)."""

from __future__ import annotations

import pytest

from common.redis_client import channel_layer_host, master_options, sentinel_address


def test_sentinel_addresses_parse_with_ipv6_and_spaces() -> None:
    assert sentinel_address(" sentinel-1:26379") == ("sentinel-1", 26379)
    assert sentinel_address("[::1]:26380") == ("::1", 26380)
    with pytest.raises(ValueError):
        sentinel_address("sentinel-1")


def test_with_sentinel_the_url_gives_database_and_password_only() -> None:
    options = master_options("redis://app:secret@ignored.example:6390/3")
    assert options == {"username": "app", "password": "secret", "db": 3}


def test_channel_layer_host_is_the_url_or_a_sentinel_dict() -> None:
    url = "redis://:pw@unused/2"
    assert channel_layer_host(url, [], "mymaster") == url
    host = channel_layer_host(url, [("s1", 26379)], "mymaster")
    assert isinstance(host, dict)
    assert host["sentinels"] == [("s1", 26379)] and host["master_name"] == "mymaster"
    assert host["db"] == 2 and host["password"] == "pw"
