"""What the simulator records: message identity for duplicates, and the per-second series."""

from __future__ import annotations

import pytest

from mxgate.sim.record import DeferralKind, Recorder, message_key

EPOCH = 1_700_000_000.0


def recorder(**kwargs: int) -> Recorder:
    return Recorder(now=0.0, epoch_offset=EPOCH, series_seconds=kwargs.get("series_seconds", 3600),
                    duplicate_sample=kwargs.get("duplicate_sample", 20))


@pytest.mark.parametrize(("content", "message_id"), [
    (b"Message-ID: <a@x>\r\n\r\nbody\r\n", "<a@x>"),
    (b"Subject: s\r\nmessage-id:<a@x>   \r\n\r\nbody\r\n", "<a@x>"),
    (b"MESSAGE-ID :\r\n <folded@x>\r\nSubject: s\r\n\r\nbody\r\n", "<folded@x>"),
    (b"Subject: no id\r\n\r\nMessage-ID: <in-the-body@x>\r\n", None),
    (b"X-Message-ID: <other-header@x>\r\n\r\nbody\r\n", None),
    (b"Message-ID: \r\n\r\nbody\r\n", None),
    (b"", None),
])
def test_message_id_comes_from_the_header_block_only(content: bytes, message_id: str | None) -> None:
    assert message_key(content)[0] == message_id


def test_without_message_id_the_body_identifies_the_message_whatever_the_headers() -> None:
    resent = message_key(b"Received: from a\r\nDate: Mon\r\n\r\nsame body\r\n")[1]
    original = message_key(b"Date: Tue\r\n\r\nsame body\r\n")[1]
    other = message_key(b"Date: Tue\r\n\r\nanother body\r\n")[1]
    assert resent == original != other


def test_duplicates_are_counted_and_sampled() -> None:
    r = recorder(duplicate_sample=2)
    for content in [b"Message-ID: <1@x>\r\n\r\na\r\n", b"Message-ID: <1@x>\r\n\r\nb\r\n",
                    b"Message-ID: <2@x>\r\n\r\na\r\n", b"Message-ID: <1@x>\r\n\r\nc\r\n",
                    b"Date: 1\r\n\r\nno id\r\n", b"Date: 2\r\n\r\nno id\r\n"]:
        r.accepted(1.0, content, 1)
    assert r.messages == 6 and r.duplicates == 3 and r.without_message_id == 2
    assert r.duplicate_ids == ["<1@x>", "<1@x>"]
    r.reset(2.0)
    r.accepted(2.0, b"Message-ID: <1@x>\r\n\r\na\r\n", 1)
    assert r.duplicates == 0          # a reset forgets what was seen


def test_per_second_series_and_report() -> None:
    r = recorder(series_seconds=3)
    for now in [0.1, 0.2, 0.9, 1.5, 4.0, 4.2, 5.0, 6.7]:
        r.accepted(now, b"\r\n\r\nx\r\n", 1)
    r.deferred(DeferralKind.RATE)
    # Unix seconds; the quiet seconds 2 and 3 are left out; only the last 3 buckets are kept.
    assert r.per_second() == [[int(EPOCH) + 4, 2], [int(EPOCH) + 5, 1], [int(EPOCH) + 6, 1]]
    report = r.snapshot(8.0)
    assert report["accepted"] == {"messages": 8, "recipients": 8, "bytes": 56, "average_per_s": 1.0,
                                  "peak_per_s": 2}
    assert report["deferrals"] == {"connections": 0, "rate": 1, "random": 0, "other": 0, "total": 1}
    assert report["since"] == "2023-11-14T22:13:20.000+00:00" and report["elapsed_s"] == 8.0
