"""The SMTP half of ``/readyz``: this process accepts a connection, greets and answers EHLO.

A gateway whose Redis is fine but whose SMTP sessions die (an interpreter bug in the protocol code, a
listener closed by mistake, a wedged accept loop) must never be ready, or Kubernetes keeps sending it
mail it can only drop. The check is a real client session over loopback (or the listening address),
ending in QUIT; it sends no MAIL, so nothing reaches the spool or the relay rules.
"""

from __future__ import annotations

import ipaddress

import aiosmtplib

PROBE_NAME = "readyz.mxgate.invalid"  # RFC 2606: a name that can never be a real client


def probe_host(listen_host: str) -> str:
    """Where to connect to reach a socket listening on ``listen_host`` (a wildcard means loopback)."""
    if listen_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if listen_host == "::":
        return "::1"
    try:
        ipaddress.ip_address(listen_host)
    except ValueError:
        return listen_host  # a name: connect to what it resolves to, as a client would
    return listen_host


async def smtp_problem(host: str, port: int, *, timeout: float) -> str | None:
    """None if ``host:port`` greets with 220 and answers EHLO with 250 within ``timeout``; else why not."""
    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=timeout, start_tls=False,
                             local_hostname=PROBE_NAME)
    try:
        await client.connect()
        reply = await client.ehlo()
        if reply.code != 250:
            return f"SMTP self-check: EHLO answered {reply.code} {reply.message[:80]}"
    except aiosmtplib.SMTPHeloError as exc:
        return f"SMTP self-check: EHLO answered {exc.code} {exc.message[:80]}"
    except aiosmtplib.SMTPConnectError as exc:
        return f"SMTP self-check: no greeting from {host}:{port} ({str(exc)[:120]})"
    except aiosmtplib.SMTPTimeoutError:
        return f"SMTP self-check: {host}:{port} did not greet and answer EHLO within {timeout:g} s"
    except (aiosmtplib.SMTPException, OSError) as exc:
        return f"SMTP self-check: session to {host}:{port} failed ({type(exc).__name__}: {str(exc)[:120]})"
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
    return None
