"""One host:port type for every layer (mesh/netif.py ``Address``, ``check_port``): the rules
the node's links, discovery (spec D6) and the Thunderbolt-IP transport (spec TB2) share, and
the parameters where they differ (a default port, what an empty host means)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError, MeshError
from mesh.netif import MAX_ADDRESS_CHARS, Address, AddressError, check_port
from mesh.node.discovery import AnnouncementError, parse_address, resolve_address
from mesh.node.links import member_address


@pytest.mark.parametrize(("text", "kwargs", "want"), [
    ("10.0.5.2:7000", {}, Address("10.0.5.2", 7000)),
    ("  node-1.local:80 ", {}, Address("node-1.local", 80)),
    ("my_host:1", {}, Address("my_host", 1)),
    ("*:7600", {}, Address("*", 7600)),
    ("[fe80::2]:7001", {}, Address("fe80::2", 7001)),
    ("[fe80::1%en0]:65535", {}, Address("fe80::1%en0", 65535)),
    ("[::]:7600", {}, Address("::", 7600)),
    (":::7600", {}, Address("::", 7600)),  # unbracketed: the port is after the last colon
    ("fe80::1:7600", {}, Address("fe80::1", 7600)),
    ("fe80::1:7600", {"default_port": 9}, Address("fe80::1:7600", 9)),  # a whole IPv6 address
    ("fe80::2%bridge0", {"default_port": 7000}, Address("fe80::2%bridge0", 7000)),
    ("[fe80::2]", {"default_port": 7000}, Address("fe80::2", 7000)),
    ("169.254.1.2", {"default_port": 7000}, Address("169.254.1.2", 7000)),
    ("169.254.1.2:5", {"default_port": 7000}, Address("169.254.1.2", 5)),
    (":7600", {"empty_host": ""}, Address("", 7600)),
    (":7600", {"empty_host": "127.0.0.1"}, Address("127.0.0.1", 7600)),
    ("x" * (MAX_ADDRESS_CHARS - 6) + ":65535", {}, Address("x" * (MAX_ADDRESS_CHARS - 6), 65535)),
])
def test_parse_reads_every_valid_form(text: str, kwargs: dict[str, object], want: Address) -> None:
    assert Address.parse(text, **kwargs) == want  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "kwargs", "says"), [
    ("10.0.5.2", {}, "has no port"),
    ("10.0.5.2:", {}, "port '' is not 1..65535"),
    ("10.0.5.2:x", {}, "port 'x' is not"),
    ("10.0.5.2:0", {}, "port '0' is not"),
    ("10.0.5.2:65536", {}, "port '65536' is not"),
    ("10.0.5.2:+5", {}, "port '+5' is not"),
    ("10.0.5.2:\u0663", {}, "is not 1..65535"),  # a non-ASCII digit
    ("[fe80::2", {}, "unbalanced brackets"),
    ("[fe80::2]x:1", {}, "unbalanced brackets"),
    ("[node]:1", {}, "brackets hold an IPv6 address only"),
    ("[10.0.0.1]:1", {}, "brackets hold an IPv6 address only"),
    (":7000", {}, "has no host"),
    ("a b:1", {}, "neither an IP address nor a host name"),
    ("h\u00e9te:1", {}, "neither an IP address nor a host name"),
    ("[fe80::1%a b]:1", {}, "brackets hold an IPv6 address only"),
    ("10.0.0.1%eth0:1", {}, "neither an IP"),  # a zone on IPv4
    ("x" * (MAX_ADDRESS_CHARS - 5) + ":65535", {}, "301 characters long; at most 300"),
    ("host", {"default_port": 0}, "default port 0 invalid"),
])
def test_parse_refuses_with_a_message_naming_the_fault(text: str, kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(AddressError, match="valid|at most") as info:
        Address.parse(text, **kwargs)  # type: ignore[arg-type]
    assert says in str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, MeshError)


def test_parse_refuses_what_is_not_text() -> None:
    with pytest.raises(AddressError, match="not a string"):
        Address.parse(7600)  # type: ignore[arg-type]


def test_str_brackets_ipv6_and_reads_back() -> None:
    for address, text in [(Address("10.0.0.1", 1), "10.0.0.1:1"), (Address("fe80::1%en0", 2), "[fe80::1%en0]:2"),
                          (Address("::", 3), "[::]:3"), (Address("node", 4), "node:4")]:
        assert str(address) == text
        assert Address.parse(text) == address


@given(st.text(max_size=80) | st.from_regex(r"\[?[0-9a-f:.%a-z]{0,20}\]?:?[0-9]{0,6}", fullmatch=True))
def test_any_text_parses_or_is_an_address_error(text: str) -> None:
    for kwargs in ({}, {"default_port": 7}, {"empty_host": ""}):
        try:
            parsed = Address.parse(text, **kwargs)  # type: ignore[arg-type]
        except AddressError:
            continue
        assert 1 <= parsed.port <= 65535
        assert Address.parse(str(parsed), **kwargs) == parsed  # type: ignore[arg-type]


def test_check_port() -> None:
    assert check_port(0) == 0 and check_port(65535, "--port") == 65535
    for bad in (-1, 65536, True, 1.0, "80", None):
        with pytest.raises(AddressError, match=r"--api-port .* invalid; valid: an integer 0\.\.65535"):
            check_port(bad, "--api-port")
    with pytest.raises(AddressError, match=r"valid: an integer 1\.\.65535"):
        check_port(0, allow_zero=False)
    with pytest.raises(AddressError):
        Address("h", 70000)


@pytest.mark.spec("D6")
def test_each_layer_keeps_its_meaning_of_an_empty_host_and_its_error_type() -> None:
    # links dial this machine for ":port"; discovery keeps it as the wildcard it resolves
    assert member_address(":7600") == Address("127.0.0.1", 7600)
    assert member_address("[::1]:7600") == Address("::1", 7600)
    assert parse_address(":7600") == Address("", 7600)
    assert resolve_address(":7600", "fe80::1%en0") == "[fe80::1%en0]:7600"
    with pytest.raises(AnnouncementError, match="has no port") as info:
        parse_address("10.0.0.1")
    assert info.value.reason == "fields"
    with pytest.raises(MeshError, match="has no port"):
        member_address("10.0.0.1")
