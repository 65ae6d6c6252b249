"""What an envelope path must be for delivery to carry it: control characters, encodings, RFC 5321 sizes.

The property at the end ties the three parties together: every address ingress accepts can be written on
an SMTP command line (aiosmtplib's own check) and in a delivery status notification, as its sender and as
a failed recipient.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime

import pytest
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX
from hypothesis import given, settings
from hypothesis import strategies as st

from mxgate.egress.dsn import RecipientFailure, build_dsn
from mxgate.envelope import MAX_DOMAIN_OCTETS, MAX_LOCAL_PART_OCTETS, MAX_PATH_OCTETS, path_problem, unsendable
from mxgate.ingress.handler import recipient_domain

CONTROL = "control characters are not allowed"
LINE_SEPARATOR = "line separators (U+0085, U+2028, U+2029) are not allowed"
LOCAL_PART = "local part longer than 64 octets (RFC 5321 section 4.5.3.1.1)"
DOMAIN = "domain longer than 255 octets (RFC 5321 section 4.5.3.1.2)"
PATH = "path longer than 256 octets (RFC 5321 section 4.5.3.1.3)"
NOT_UTF8 = "not valid UTF-8"

# 254 octets: with its angle brackets exactly the 256 of RFC 5321 §4.5.3.1.3.
LONGEST_ADDRESS = "u@" + ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 60])


@pytest.mark.parametrize(("address", "problem"), [
    ("user@outlook.test", None),
    ('"john doe"@example.com', None),
    ('""@example.com', None),
    ("jörg@bücher.example", None),
    ("a" * 64 + "@example.com", None),
    (LONGEST_ADDRESS, None),
    ("a\x00b@example.com", CONTROL),                # NUL
    ('"a\x00b"@example.com', CONTROL),              # ... quoted, which the syntax check lets through
    ("a\x01b@example.com", CONTROL),
    ("a\x1bb@example.com", CONTROL),                # ESC
    ("a\x1fb@example.com", CONTROL),
    ("a\x7fb@example.com", CONTROL),                # DEL
    ("a\tb@example.com", CONTROL),
    ("user@example.com\r\n", CONTROL),
    ("j\udcffrg@example.com", NOT_UTF8),            # aiosmtpd's surrogate escape for the octet 0xFF
    ('"a\u2028 b"@example.com', LINE_SEPARATOR),
    ('"a\x85 b"@example.com', LINE_SEPARATOR),
    ('"a\u2029 b"@example.com', LINE_SEPARATOR),
    ("a" * 65 + "@example.com", LOCAL_PART),
    ("é" * 33 + "@example.com", LOCAL_PART),        # 66 octets in 33 characters: octets count
    ("u@" + "d" * 256, DOMAIN),
    (LONGEST_ADDRESS + "d", PATH),                  # 255 octets + "<>" = 257
    ("x" * 255, PATH),                              # no "@": only the path is measured
    ("a\x00" + "b" * 70 + "@example.com", CONTROL),  # the first problem is named
])
def test_path_problem(address: str, problem: str | None) -> None:
    assert path_problem(address) == problem


def test_the_limits_are_rfc_5321s() -> None:
    assert (MAX_LOCAL_PART_OCTETS, MAX_DOMAIN_OCTETS, MAX_PATH_OCTETS) == (64, 255, 256)
    assert len(LONGEST_ADDRESS.encode()) + 2 == MAX_PATH_OCTETS


@pytest.mark.parametrize("code", range(0x80))
def test_unsendable_agrees_with_aiosmtplib_on_every_ascii_character(code: int) -> None:
    # aiosmtplib raises ValueError for a command argument its regex matches: that must be exactly what
    # delivery answers itself instead of sending (and what ingress refuses).
    address = f"a{chr(code)}b@example.com"
    refused_by_aiosmtplib = COMMAND_INJECTION_REGEX.search(address.encode()) is not None
    assert (unsendable(address) is not None) is refused_by_aiosmtplib
    assert (path_problem(address) == CONTROL) is refused_by_aiosmtplib


def test_unsendable_leaves_utf8_alone() -> None:
    assert unsendable("jörg@bücher.example") is None
    assert unsendable('"a\u2028 b"@example.com') is None   # sendable; only the DSN could not be written
    assert unsendable("j\udcffrg@example.com") == NOT_UTF8


# -- everything ingress accepts, delivery can send and report on ----------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
_ALPHABET = string.printable + 'éü中😀\x00\x7f\u00a0\u3000\x85\u2028\u2029\ufeff\u200b"\\+='
_local = st.text(_ALPHABET, max_size=70)
_quoted = _local.map(lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
_domain = st.sampled_from(["example.com", "bücher.example", "a.b", "x" * 63 + ".test", "é" * 60 + ".test",
                           "d" * 63 + "." + "e" * 63 + "." + "f" * 63 + ".test"])


@settings(max_examples=500)
@given(st.one_of(_local, _quoted), _domain)
def test_every_accepted_address_can_be_sent_and_notified(local: str, domain: str) -> None:
    address = f"{local}@{domain}"
    if recipient_domain(address) is None or path_problem(address) is not None:
        return  # refused at MAIL / RCPT
    assert unsendable(address) is None
    failure = RecipientFailure(recipient=address, status="5.1.1", remote_mta="mx.example.net",
                               diagnostic="550 5.1.1 User unknown")
    build_dsn(reporting_mta="mxgate.test", sender=address, queue_id="Q1", arrival=NOW, now=NOW,
              failures=[failure], original=b"Subject: hello\r\n\r\nbody\r\n")
