"""Pure ingress decisions: address syntax, bare line endings, who may relay, the credentials file format."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Session
from hypothesis import given
from hypothesis import strategies as st

from mxgate.errors import ConfigError
from mxgate.ingress.auth import Credentials
from mxgate.ingress.handler import IngressHandler, IngressPolicy, recipient_domain
from mxgate.smtpwire import has_bare_line_ending, scan_lines

# -- recipient_domain ---------------------------------------------------------------------------------

LONGEST_DOMAIN = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 octets, RFC 1035's limit

VALID_ADDRESSES = [
    ("user@outlook.test", "outlook.test"),
    ("User.Name@Outlook.TEST", "outlook.test"),                  # the domain is case-insensitive
    ("user@outlook.test.", "outlook.test"),                      # the root dot
    ("first.last+tag@mail.example.co.uk", "mail.example.co.uk"),
    ('"john doe"@example.com', "example.com"),                   # quoted local part
    ('"a\\"b@c"@example.com', "example.com"),                    # ... with an escaped quote and an @
    ("jörg@bücher.example", "bücher.example"),                   # SMTPUTF8
    ("u@xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("u@a-b--c.example", "a-b--c.example"),
    ("u@0.example", "0.example"),
    (f"u@{'a' * 63}.test", f"{'a' * 63}.test"),
    (f"u@{LONGEST_DOMAIN}", LONGEST_DOMAIN),
]

INVALID_ADDRESSES = [
    "",
    "user",
    "@example.com",
    "user@",
    "user@localhost",                  # a relay only sends to fully qualified domains
    "user@[192.0.2.1]",                # address literals
    "user@[IPv6:2001:db8::1]",
    "user@-bad.example",
    "user@bad-.example",
    "user@bad_label.example",          # host names have no underscore (RFC 5321 Ldh-str)
    "user@_dmarc.example",
    "user@example..com",
    "user@.example.com",
    "user@exa mple.com",
    "us er@example.com",
    "a@b@example.com",
    "<user@example.com>",
    "user@example.com>",
    "user@example.com\n",              # "$" alone would match before a trailing newline
    "user@example.com\r\n",
    "\nuser@example.com",
    "user@exam\rple.com",
    '"unterminated@example.com',
    f"u@{'a' * 64}.test",              # a label longer than 63 octets
    f"u@{LONGEST_DOMAIN}d",            # 254 octets
]


@pytest.mark.parametrize(("address", "domain"), VALID_ADDRESSES)
def test_recipient_domain_of_valid_address(address: str, domain: str) -> None:
    assert recipient_domain(address) == domain


@pytest.mark.parametrize("address", INVALID_ADDRESSES)
def test_recipient_domain_refuses_invalid_address(address: str) -> None:
    assert recipient_domain(address) is None


# -- has_bare_line_ending -----------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "bare"), [
    (b"", False),
    (b"no line ending", False),
    (b"one\r\ntwo\r\n", False),
    (b"\r\n\r\n.\r\n", False),
    (b"\n", True),
    (b"\r", True),
    (b"a\nb\r\n", True),
    (b"a\rb\r\n", True),
    (b"\r\r\n", True),                 # CR CR LF: the first CR is bare
    (b"\r\n\n", True),                 # CR LF LF: the second LF is bare
    (b"\n\r", True),
    (b"body\r\n\n.\r\nMAIL FROM:<x@y.z>\r\n", True),
    (b"body\n.\nQUIT\r\n", True),
    (b"body\r.\r\n", True),
    (b"body\r\n.\r", True),
    (b"ends with a bare CR\r", True),
])
def test_has_bare_line_ending(data: bytes, bare: bool) -> None:
    assert has_bare_line_ending(data) is bare


def bare_line_ending_reference(data: bytes) -> bool:
    """Byte by byte: a CR not followed by LF, or an LF not preceded by CR."""
    for index, byte in enumerate(data):
        if byte == 0x0D and data[index + 1:index + 2] != b"\n":
            return True
        if byte == 0x0A and (index == 0 or data[index - 1] != 0x0D):
            return True
    return False


# Random bytes rarely hold CRs and LFs next to each other: also build data from the pieces that matter.
line_ending_soup = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"x", b"\x00"]), max_size=40).map(
    b"".join)


@given(st.one_of(st.binary(max_size=200), line_ending_soup))
def test_has_bare_line_ending_agrees_with_a_byte_by_byte_reference(data: bytes) -> None:
    assert has_bare_line_ending(data) is bare_line_ending_reference(data)


clean_lines = st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                       max_size=10)


@given(clean_lines, st.sampled_from([b"\r", b"\n"]), st.data())
def test_one_bare_cr_or_lf_anywhere_in_crlf_text_is_found(
        lines: list[bytes], ending: bytes, data: st.DataObject) -> None:
    text = b"\r\n".join(lines)
    position = data.draw(st.integers(0, len(text)), label="position")
    assert not has_bare_line_ending(text)
    assert has_bare_line_ending(text[:position] + ending + text[position:])


# -- may_relay --------------------------------------------------------------------------------------------

ALLOWED = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"),
           ipaddress.ip_network("fe80::/10"))


@pytest.mark.parametrize(("peer", "authenticated", "relays"), [
    (("192.0.2.7", 40000), None, True),
    (("198.51.100.7", 40000), None, False),
    (("198.51.100.7", 40000), True, True),               # authenticated: from anywhere
    (("2001:db8::7", 40000, 0, 0), None, True),
    (("2001:db9::7", 40000, 0, 0), None, False),
    (("::ffff:192.0.2.7", 40000, 0, 0), None, True),     # IPv4-mapped, from a dual-stack socket
    (("::ffff:198.51.100.7", 40000, 0, 0), None, False),
    (("fe80::1%eth0", 40000, 0, 2), None, True),         # a scope id is not part of the address
    ("/run/mxgate/smtp.sock", None, False),              # no address, no relay
    (None, None, False),
    (("not-an-address", 40000), None, False),
], ids=["v4-inside", "v4-outside", "v4-outside-authenticated", "v6-inside", "v6-outside", "v4-mapped-inside",
        "v4-mapped-outside", "v6-scoped-inside", "unix-socket", "no-peer", "unparsable"])
def test_may_relay(peer: Any, authenticated: bool | None, relays: bool) -> None:
    handler = IngressHandler(IngressPolicy(hostname="mxgate.test", allowed_networks=ALLOWED),
                             spool=None, router=None, metrics=None)  # not used by may_relay
    session = Session(loop=None)  # type: ignore[arg-type]  # a Session only keeps its loop
    session.peer = peer
    session.authenticated = authenticated
    assert handler.may_relay(session) is relays


# -- the credentials file ---------------------------------------------------------------------------------

# A real argon2id hash (of "secret"): the parser checks its structure; nothing is verified here.
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c23HnVFpYQ1Igr2gJbvuaA$N6aKxfxjPO0PYtM7UK8pX0K3GLVH8MMFiQb1QkE9sKk"


def test_credentials_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text(f"# mxgate users\r\n\r\n  orders-app:{HASH}  \r\nbilling:{HASH}\r\n", encoding="utf-8")
    assert Credentials.load(path).users == {"orders-app": HASH, "billing": HASH}


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("orders-app\n", 1, "expected 'user:$argon2id$...'"),
    ("# users\n\norders-app:hunter2\n", 3, "expected 'user:$argon2id$...'"),
    (f":{HASH}\n", 1, "expected 'user:$argon2id$...'"),
    ("orders-app:$argon2id$v=19$m=65536,t=3,p=4$...\n", 1, "not an argon2 hash"),  # the docs' example
    (f"orders-app:{HASH}\nbilling:{HASH}\norders-app:{HASH}\n", 3, "user 'orders-app' appears twice"),
])
def test_malformed_credentials_file_names_file_and_line(
        tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = tmp_path / "credentials"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        Credentials.load(path)
    assert str(error.value).startswith(f"{path}:{line}: ") and problem in str(error.value), str(error.value)
    assert "hunter2" not in str(error.value)  # a password pasted by mistake is not echoed into logs


def test_missing_credentials_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read credentials file"):
        Credentials.load(tmp_path / "absent")


@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"a", b"x" * 7]), max_size=60).map(b"".join))
def test_scan_lines_agrees_with_the_two_checks(data: bytes) -> None:
    longest, bare = scan_lines(data)
    assert bare is has_bare_line_ending(data)
    assert longest == longest_line_reference(data)


def longest_line_reference(data: bytes) -> int:
    """Byte by byte: the longest run between CRLFs (a bare CR or LF is part of its line)."""
    longest = run = index = 0
    while index < len(data):
        if data[index:index + 2] == b"\r\n":
            longest, run, index = max(longest, run), 0, index + 2
        else:
            run, index = run + 1, index + 1
    return max(longest, run)
