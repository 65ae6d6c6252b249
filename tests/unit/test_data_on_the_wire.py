"""The DATA mxgate sends is what aiosmtplib's own (slower) path would send, for any body."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from mxgate.egress.session import END_OF_DATA, data_on_the_wire

# Bodies made of the pieces that matter: line ends of every kind and dots at line starts.
pieces = st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"\xff", b" ", b"\r\n.\r\n", b"\n.\r"])
bodies = st.lists(pieces, max_size=40).map(b"".join)


def reference(body: bytes) -> bytes:
    """aiosmtplib's execute_data_command: normalise line ends, stuff dots, append the end of data."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"


@given(bodies)
def test_same_bytes_as_aiosmtplib(body: bytes) -> None:
    assert data_on_the_wire(body) + END_OF_DATA == reference(body)


def test_examples() -> None:
    assert data_on_the_wire(b"") == b"\r\n"
    assert data_on_the_wire(b".hidden\r\nx\r\n.\r\n") == b"..hidden\r\nx\r\n..\r\n"
    assert data_on_the_wire(b"a\nb") == b"a\r\nb\r\n"
    body = b"Subject: x\r\n\r\n" + b"line of text\r\n" * 8000
    assert data_on_the_wire(body) is body   # the common case: nothing to change, no copy
