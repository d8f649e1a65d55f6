"""Where outbound webhooks may go: the one address policy of the submit check and the sender's connections."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from inferstream.errors import InferstreamError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolve = Callable[[str, int], Awaitable[list[str]]]
"""``resolve(host, port)`` -> the addresses ``host`` resolves to (``socket.gaierror`` if none)."""

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
# Prefixes that carry an IPv4 address in their last 32 bits (NAT64): the IPv4 address decides.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


class EgressRefused(InferstreamError):
    """A webhook target is internal and not allowed (or cannot be resolved to check it)."""

    def __init__(self, host: str, reason: str, address: str | None = None) -> None:
        at = f" ({address})" if address and address != host else ""
        super().__init__(f"host {host!r}{at} refused: {reason}")
        self.host = host
        self.reason = reason
        self.address = address


def _ipv4_part(part: str) -> int | None:
    """One part of a legacy IPv4 spelling (``0x7f``, ``0177``, ``127``), as resolvers read it."""
    if part[:2].lower() == "0x":
        digits, base = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits:
        return 0 if base == 16 else None
    try:
        return int(digits, base) if digits.isascii() and digits.isalnum() else None
    except ValueError:
        return None


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """``host`` read as inet_aton and the WHATWG URL parser read it: 2130706433, 0177.0.0.1, 0x7f.1."""
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # a trailing dot is allowed
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_ipv4_part(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    values = [n for n in numbers if n is not None]
    *head, last = values
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(values)):
        return None
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def parse_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address in any spelling a resolver accepts, or None for a hostname."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    if ":" in bare:
        return None
    return _legacy_ipv4(bare)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def internal_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address (None when it is one)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            if (reason := internal_reason(embedded)) is not None:
                return f"{reason} (IPv4 {embedded} inside IPv6)"
            if ip.ipv4_mapped is not None:
                return None  # a mapped address is its IPv4 address
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("not globally routable", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def _normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class EgressPolicy:
    """Internal addresses are refused unless their hostname or a CIDR holding them is allowed."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @staticmethod
    @functools.cache
    def parse(allow: str) -> EgressPolicy:
        """From ``INFERSTREAM_WEBHOOK_ALLOW``: comma-separated hostnames and CIDRs (a bare IP is a /32 or /128)."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for item in (i.strip() for i in allow.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = _normal_host(item)
            if not _HOSTNAME.match(name) or parse_ip(name) is not None:
                raise ValueError(
                    f"INFERSTREAM_WEBHOOK_ALLOW: {item!r} is neither a hostname nor a CIDR"
                )
            hosts.add(name)
        return EgressPolicy(frozenset(hosts), tuple(networks))

    def host_allowed(self, host: str) -> bool:
        return _normal_host(host) in self.hosts

    def check_address(self, host: str, ip: IPAddress) -> None:
        """Raise :class:`EgressRefused` if ``ip`` (what ``host`` names) is internal and not allowed."""
        reason = internal_reason(ip)
        if reason is None:
            return
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if any(c in net for c in candidates for net in self.networks):
            return
        raise EgressRefused(host, f"{reason} address", str(ip))

    def check_addresses(self, host: str, addresses: Iterable[str]) -> None:
        """Every address must pass: one internal answer is enough to refuse a name."""
        for address in addresses:
            self.check_address(host, ipaddress.ip_address(address))

    def check_literal(self, host: str) -> IPAddress | None:
        """Check ``host`` if it is an IP address (any spelling); return the address, or None for a name."""
        ip = parse_ip(host)
        if ip is not None and not self.host_allowed(host):
            self.check_address(host, ip)
        return ip

    async def check_host(
        self, host: str, port: int, *, timeout_s: float, resolve: Resolve | None = None
    ) -> None:
        """Refuse ``host`` if it is, or resolves to, an internal address that is not allowed."""
        if self.host_allowed(host) or self.check_literal(host) is not None:
            return
        name = _normal_host(host)
        if name == "localhost" or name.endswith(".localhost"):
            # RFC 6761: always loopback; refused without asking any resolver.
            self.check_address(host, ipaddress.IPv4Address("127.0.0.1"))
            return
        try:
            async with asyncio.timeout(timeout_s):
                addresses = await (resolve or system_resolve)(name, port)
        except TimeoutError:
            raise EgressRefused(host, f"did not resolve within {timeout_s:g} s") from None
        except (socket.gaierror, UnicodeError) as exc:
            raise EgressRefused(host, f"does not resolve ({exc})") from None
        if not addresses:
            raise EgressRefused(host, "does not resolve (no addresses)")
        self.check_addresses(host, addresses)


async def system_resolve(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives ``host`` (what a connection would use)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses internal answers, so the connection goes to an address it checked.

    aiohttp connects to the addresses its resolver returns, so checking them here
    pins the checked address: a name that re-resolves elsewhere (DNS rebinding)
    between submit and delivery is checked again, at the moment of connecting.
    """

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self._policy.host_allowed(host):
            self._policy.check_addresses(host, [r["host"] for r in results])
        return results

    async def close(self) -> None:
        await self._inner.close()
