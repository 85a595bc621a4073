"""Which client a network address stands for, for every limit kept per address (the
address budgets, connections per IP, failed authentications, history replays at
once): an IPv4 address is itself, and an IPv6 address stands for its whole /64, the
block one host (or one customer) gets and may pick any address of (SLAAC privacy
addresses): a limit kept per exact IPv6 address would let one host rotate past it."""

from __future__ import annotations

import ipaddress

IPV6_BLOCK_PREFIX = 64


def address_block(address: str) -> str:
    """The key an address is limited under: itself, or its /64 for IPv6 (an IPv4
    address written as IPv6, ``::ffff:192.0.2.1``, is that IPv4 address)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, IPV6_BLOCK_PREFIX), strict=False))
