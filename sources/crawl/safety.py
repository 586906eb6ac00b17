"""Rules that keep the crawler away from non-web schemes and internal networks.

A URL taken from the web may point at ``http://169.254.169.254/`` (cloud metadata), a router on
the local network or a service on the crawling machine itself. Every URL, and every redirect
hop, is checked here before anything connects: the scheme must be http or https and every
address the host resolves to must be a public one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeURL(Exception):
    """A URL the crawler must not fetch.

    ``reason`` is ``scheme`` (not http or https), ``invalid_url`` (does not parse), ``no_host``,
    ``private_address`` (resolves to a non-public address) or ``unresolvable``.
    """

    def __init__(self, reason: str, url: str, detail: str = ""):
        message = f"{reason}: {url}" + (f" ({detail})" if detail else "")
        super().__init__(message)
        self.reason = reason
        self.url = url
        self.detail = detail


# Letters (any script, for international names), digits, hyphens, underscores and dots.
_HOST_NAME = re.compile(r"[\w.-]+")


def check_scheme(url: str) -> None:
    """Raise :class:`UnsafeURL` unless ``url`` is an absolute http or https URL with a host and,
    if it names one, a port from 0 to 65535."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        # httpx takes any number as a port; the socket layer would then raise OverflowError.
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        raise UnsafeURL("invalid_url", url, str(exc)) from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise UnsafeURL("scheme", url, f"scheme {parts.scheme!r} is not http or https")
    if not host:
        raise UnsafeURL("no_host", url)
    if ":" not in host and not _HOST_NAME.fullmatch(host):
        # A space or a percent escape in a name is no DNS name: the lookup could only fail.
        raise UnsafeURL("invalid_url", url, f"host {host!r} is not a DNS name")


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is a globally routable unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv6 socket reaches the embedded IPv4 address, so judge that one.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            address = embedded
    if (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    ):
        return False
    # Catches the rest of the special-purpose registry too, e.g. shared address space
    # 100.64.0.0/10, where some clouds put their metadata service.
    return address.is_global


def _normalise(host: str) -> str:
    host = host.strip("[]").lower()
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


async def check_host(host: str, port: int, allow_private_hosts: frozenset[str]) -> list[str]:
    """Resolve ``host`` and return its addresses; raise :class:`UnsafeURL` if it is not public.

    Every resolved address must be public, since a connection may use any of them. A host
    listed in ``allow_private_hosts`` (by name, or by address when the URL names an IP) is
    exempt from that rule; a name is not exempted by an address it resolves to.
    """
    where = f"{host}:{port}"
    name = _normalise(host)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except UnicodeError as exc:
        # The name cannot be encoded for DNS (an empty or over-long label): no lookup is made.
        raise UnsafeURL("invalid_url", where, str(exc)) from exc
    except OSError as exc:
        raise UnsafeURL("unresolvable", where, str(exc)) from exc
    # Drop an IPv6 zone ("fe80::1%eth0"): ipaddress does not parse it on every Python.
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addresses:
        raise UnsafeURL("unresolvable", where, "no addresses")
    allowed = {_normalise(entry) for entry in allow_private_hosts}
    if name in allowed:
        return addresses
    for text in addresses:
        if not is_public(ipaddress.ip_address(text)):
            raise UnsafeURL("private_address", where, f"resolves to {text}")
    return addresses
