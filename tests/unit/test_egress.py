"""The webhook address policy: literal spellings, address classes, the allow-list, resolution, the submit check.

Nothing here opens a socket: every name is answered by a stub resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import orjson
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from inferstream.egress import (
    EgressPolicy,
    EgressRefused,
    GuardedResolver,
    Resolve,
    internal_reason,
    parse_ip,
)
from inferstream.errors import InvalidRequest
from inferstream.settings import Settings
from schemas.api import check_callback_url, parse_submission

ROUTES = {"generate": ["sim-gpt"], "embed": ["all-MiniLM-L6-v2"]}
STRICT = EgressPolicy.parse("")


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that tried the network would fail the test instead of sending anything."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a socket was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7F000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("::1", "::1"),
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),  # WHATWG reads an empty hex part as 0
    ],
)
def test_every_spelling_of_an_address_is_read_as_a_resolver_reads_it(
    host: str, address: str
) -> None:
    assert parse_ip(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    "host", ["example.com", "1.2.3.4.5", "256.1.1.1", "08.0.0.1", "١٢٧.0.0.1", "12a.0.0.1"]
)
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ip(host) is None


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "private"),  # reserved, listed by Python among the private ranges
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "private (IPv4 10.0.0.1 inside IPv6)"),
        ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 inside IPv6)"),
        ("2002:7f00:1::", "loopback (IPv4 127.0.0.1 inside IPv6)"),  # 6to4
        ("64:ff9b::a9fe:a9fe", "link-local (IPv4 169.254.169.254 inside IPv6)"),  # NAT64
        ("::7f00:1", "reserved"),  # IPv4-compatible, deprecated
    ],
)
def test_internal_addresses_are_classified(address: str, reason: str) -> None:
    assert internal_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert internal_reason(ipaddress.ip_address(address)) is None
    STRICT.check_address("h", ipaddress.ip_address(address))


def test_allow_list_parsing() -> None:
    policy = EgressPolicy.parse(" 127.0.0.0/8, ::1 ,localhost, Hooks.Example.COM., 10.0.0.7")
    assert policy.hosts == {"localhost", "hooks.example.com"}
    assert [str(n) for n in policy.networks] == ["127.0.0.0/8", "::1/128", "10.0.0.7/32"]
    assert EgressPolicy.parse("") == EgressPolicy()
    with pytest.raises(ValueError, match="'not a host!'"):
        EgressPolicy.parse("127.0.0.0/8,not a host!")


def test_allowed_cidr_admits_its_addresses_and_their_mapped_spelling() -> None:
    policy = EgressPolicy.parse("127.0.0.0/8")
    for host in ("127.0.0.1", "127.9.9.9", "[::ffff:127.0.0.1]", "0x7f.1"):
        assert policy.check_literal(host) is not None
    with pytest.raises(EgressRefused) as err:
        policy.check_literal("10.0.0.1")
    assert err.value.host == "10.0.0.1" and err.value.reason == "private address"


def answers(*addresses: str, delay: float = 0.0, calls: list[str] | None = None) -> Resolve:
    """A stub resolver: these addresses (none: the name does not exist), after ``delay``."""

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        await asyncio.sleep(delay)
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(addresses)

    return resolve


async def test_a_name_is_refused_if_any_of_its_addresses_is_internal() -> None:
    await STRICT.check_host("hooks.example.com", 443, timeout_s=1, resolve=answers("93.184.216.34"))
    with pytest.raises(EgressRefused) as err:
        await STRICT.check_host(
            "hooks.example.com", 443, timeout_s=1, resolve=answers("93.184.216.34", "10.0.0.5")
        )
    assert err.value.address == "10.0.0.5" and err.value.reason == "private address"


async def test_unresolvable_and_slow_names_are_refused() -> None:
    with pytest.raises(EgressRefused, match="does not resolve"):
        await STRICT.check_host("nowhere.example", 80, timeout_s=1, resolve=answers())
    with pytest.raises(EgressRefused, match="did not resolve within 0.05 s"):
        await STRICT.check_host(
            "slow.example", 80, timeout_s=0.05, resolve=answers("93.184.216.34", delay=5)
        )


async def test_localhost_names_are_refused_without_asking_dns() -> None:
    calls: list[str] = []
    for host in ("localhost", "LOCALHOST.", "api.localhost"):
        with pytest.raises(EgressRefused, match="loopback"):
            await STRICT.check_host(host, 80, timeout_s=1, resolve=answers("8.8.8.8", calls=calls))
    assert calls == []


async def test_allowed_names_and_cidrs() -> None:
    calls: list[str] = []
    policy = EgressPolicy.parse("hooks.internal,10.0.0.0/8")
    await policy.check_host("hooks.internal", 80, timeout_s=1, resolve=answers(calls=calls))
    assert calls == []  # an allowed name is not resolved at all
    await policy.check_host("other.internal", 80, timeout_s=1, resolve=answers("10.1.1.1"))
    with pytest.raises(EgressRefused):
        await policy.check_host("other.internal", 80, timeout_s=1, resolve=answers("192.168.0.1"))


class StubResolver(AbstractResolver):
    """What DNS says at connect time (a rebinding attacker's answer, here)."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [
            {
                "hostname": host,
                "host": self.address,
                "port": port,
                "family": family,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("address", ["10.0.0.5", "169.254.169.254", "::1", "fd00::1"])
async def test_connect_time_resolver_refuses_internal_answers(address: str) -> None:
    guarded = GuardedResolver(STRICT, StubResolver(address))
    with pytest.raises(EgressRefused) as err:
        await guarded.resolve("hooks.example.com", 443)
    assert err.value.address == address


async def test_connect_time_resolver_passes_public_and_allowed_answers() -> None:
    public = await GuardedResolver(STRICT, StubResolver("93.184.216.34")).resolve("h.example", 80)
    assert [r["host"] for r in public] == ["93.184.216.34"]
    allowed = GuardedResolver(EgressPolicy.parse("h.example"), StubResolver("10.0.0.5"))
    assert [r["host"] for r in await allowed.resolve("h.example", 80)] == ["10.0.0.5"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost:8080/hook",
        "http://[::ffff:127.0.0.1]:8080/hook",
        "http://[::1]/hook",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.1/",
        "http://169.254.169.254/latest/meta-data/",
        "https://10.0.0.1/hook",
        "http://[fe80::1%25eth0]/hook",
        "http://0.0.0.0:8080/",
    ],
)
async def test_submit_refuses_internal_callback_urls(url: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        await check_callback_url(url, Settings(), resolve=answers("8.8.8.8"))
    body = err.value.body()["error"]
    assert body["type"] == "invalid_request"
    assert body["field"] == "callback_url" and "refused" in body["message"]


async def test_submit_resolves_names_and_honours_the_allow_list() -> None:
    s = Settings()
    await check_callback_url("https://93.184.216.34/hook", s)  # a public literal: no DNS at all
    await check_callback_url("https://hooks.example.com/x", s, resolve=answers("93.184.216.34"))
    with pytest.raises(InvalidRequest, match="10.0.0.5"):
        await check_callback_url("https://hooks.example.com/x", s, resolve=answers("10.0.0.5"))
    with pytest.raises(InvalidRequest, match="does not resolve"):
        await check_callback_url("https://nowhere.example/x", s, resolve=answers())
    dev = Settings(webhook_allow="127.0.0.0/8,::1,localhost")
    for url in ("http://127.0.0.1:9/h", "http://localhost:9/h", "http://[::1]:9/h"):
        await check_callback_url(url, dev)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "http:///nohost",
        "http://user:pw@example.com/",
        "http://example.com:99999/",
        "http://example.com:0/",
        "http://" + "a" * 2050 + ".com/",
        "not a url",
    ],
)
def test_callback_url_shape_is_checked_when_parsing(url: str) -> None:
    body = orjson.dumps({"task": "embed", "input": "x", "callback_url": url})
    with pytest.raises(InvalidRequest) as err:
        parse_submission(body, ROUTES)
    assert err.value.body()["error"]["field"] == "callback_url"
