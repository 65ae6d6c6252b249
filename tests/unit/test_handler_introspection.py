"""aiosmtpd introspects the objects it is given on every connection; they must survive it on every Python
mxgate claims.

aiosmtpd's ``SMTP.__init__`` runs ``inspect.getmembers()`` on itself and on the handler. On Debian 12's
CPython 3.11.2 that raises ``TypeError: descriptor '__weakref__' ... doesn't apply`` for an instance of a
``@dataclass(slots=True)`` class, and every SMTP connection was dropped. These tests hold the rule on any
Python; CI also runs the integration tests on Debian's own ``/usr/bin/python3`` (``.ci/test``).
"""

from __future__ import annotations

import inspect

import pytest
from aiosmtpd.smtp import SMTP

from mxgate.ingress.handler import IngressHandler, IngressPolicy
from mxgate.ingress.smtp import IngressSMTP
from mxgate.telemetry.metrics import Metrics


@pytest.mark.parametrize("cls", [IngressHandler, IngressSMTP])
def test_introspected_classes_are_not_slotted(cls: type) -> None:
    # __slots__ on a class aiosmtpd inspects is exactly what 3.11.2 trips over.
    assert not any("__slots__" in vars(klass) for klass in cls.__mro__ if klass.__module__.startswith("mxgate"))


def test_aiosmtpd_accepts_our_handler() -> None:
    handler = IngressHandler(IngressPolicy(hostname="mx.test"), None, None, Metrics())  # type: ignore[arg-type]
    assert {name for name, _ in inspect.getmembers(handler)} >= {"handle_MAIL", "handle_RCPT", "handle_DATA"}
    smtp = IngressSMTP(handler, authenticator=None, hostname="mx.test")
    assert isinstance(smtp, SMTP)
    assert set(smtp._handle_hooks) >= {"EHLO", "MAIL", "RCPT", "DATA"}
