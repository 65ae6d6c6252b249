"""A private, throwaway Postfix instance configured as a relay, for benchmarks.

The instance lives entirely in one temporary directory::

    DIR/etc/main.cf, DIR/etc/master.cf   config_directory   (postfix -c DIR/etc ...)
    DIR/spool/                            queue_directory
    DIR/data/                             data_directory
    DIR/maillog                           maillog_file (postlogd), all of the instance's logging

It is started with ``postfix -c DIR/etc start`` and stopped with ``postfix -c DIR/etc stop``
(``abort``, then SIGKILL of the master, if it will not stop). It never reads or writes the
system configuration in /etc/postfix, except that Postfix itself reads its packaging
metadata from ``meta_directory`` (``postfix-files``, ``postfix-script``, ``dynamicmaps.cf``)
there, read-only. A system Postfix may or may not be running: nothing here depends on it,
and the two instances share no port, queue, pid or lock file.

The configuration is "Postfix's defaults, made into a loopback relay":

* smtpd on ``127.0.0.1:PORT`` only (``inet_interfaces = 127.0.0.1``, ``inet_protocols = ipv4``);
* relay allowed from ``mynetworks = 127.0.0.0/8``;
* everything relayed to ``relayhost = [127.0.0.1]:SINKPORT``, no DNS
  (``smtp_dns_support_level = disabled``, ``smtp_host_lookup = native``);
* no local delivery (``mydestination`` empty, ``local_transport = error:...``, no aliases);
* no TLS (neither smtp-source nor smtp-sink speak it);
* **concurrency, process limits, in_flow_delay, connection caching: Postfix's defaults** —
  this is the configuration we compare mxgate against, so it is not tuned.

Running as root is expected (``mail_owner = postfix``, ``setgid_group = postdrop`` as on
Debian); master starts the daemons as ``postfix``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from _procs import LOOPBACK, BenchError, find_free_port, log_tail, require_tool, tool_output, wait_for_port

_QUEUE_ID = re.compile(r"\b[0-9A-F]{10,12}: ")

__all__ = ["POSTFIX_DEFAULTS_NOTE", "PostfixRelay", "postfix_version"]

#: Printed with the results: what the Postfix side is and is not tuned for.
POSTFIX_DEFAULTS_NOTE = (
    "Postfix runs with its default concurrency and process limits "
    "(default_destination_concurrency_limit={dcl}, initial_destination_concurrency={idc}, "
    "default_process_limit={dpl}, in_flow_delay={ifd}, smtp_connection_cache_on_demand={cc}); "
    "only relay/loopback/no-DNS/no-local-delivery/logging settings are changed."
)

# master.cf: the services a relay needs, none chrooted (the instance has no chroot jail),
# smtpd on a loopback port, postlogd for maillog_file. No local/virtual/pipe delivery agents.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=${{multi_instance_name?{{$multi_instance_name}}:{{postfix}}}}/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_MAIN_CF = """\
# Throwaway Postfix relay written by bench/_postfix.py. Not a template for production.
compatibility_level = 3.6

# Where this instance lives (nothing shared with the system Postfix).
config_directory = {etc}
queue_directory = {spool}
data_directory = {data}
syslog_name = postfix-bench
maillog_file = {maillog}
maillog_file_prefixes = {root}

# Identity without DNS.
myhostname = relay.bench.invalid
mydomain = bench.invalid
myorigin = $myhostname
append_dot_mydomain = no
biff = no

# Listen on loopback IPv4 only; the smtpd port is in master.cf.
inet_interfaces = {loopback}
inet_protocols = ipv4

# Relay for loopback clients; no local delivery at all.
mynetworks_style = host
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled in this benchmark relay
alias_maps =
alias_database =

# Everything goes to the sink, without DNS.
relayhost = [{loopback}]:{sink_port}
smtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native

# Neither smtp-source nor smtp-sink speaks TLS.
smtpd_tls_security_level = none
smtp_tls_security_level = none
"""


def postfix_version() -> str:
    """The installed Postfix version (``postconf -d -h mail_version``), or "" if unknown."""
    try:
        return tool_output([require_tool("postconf"), "-d", "-h", "mail_version"])
    except BenchError:
        return ""


@dataclass
class PostfixRelay:
    """A private Postfix relay in ``root`` that forwards everything to ``[127.0.0.1]:sink_port``.

    Use as a context manager (``with PostfixRelay(root, sink_port) as relay:``): entering
    writes the configuration, runs ``postfix check`` and starts the instance; leaving always
    stops it, also after an error or Ctrl-C.
    """

    root: Path
    sink_port: int
    listen_port: int = 0
    started: bool = field(default=False, init=False)
    _master_pgid: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        if not self.listen_port:
            self.listen_port = find_free_port()
        self.postfix = require_tool("postfix")
        self.postconf = require_tool("postconf")

    # Paths -----------------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        """The instance's config_directory (what ``postfix -c`` gets)."""
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        """The instance's queue_directory."""
        return self.root / "spool"

    @property
    def data_dir(self) -> Path:
        """The instance's data_directory."""
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        """The instance's maillog_file."""
        return self.root / "maillog"

    @property
    def master_pid_file(self) -> Path:
        """master's pid file (``queue_directory/pid/master.pid``)."""
        return self.queue_dir / "pid" / "master.pid"

    # Setup -----------------------------------------------------------------------------
    def write_config(self) -> None:
        """Create the directory tree and write main.cf and master.cf."""
        # Postfix's daemons run as mail_owner and must be able to traverse to the queue.
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # mkdtemp makes it 0700
        for parent in self.root.parents:
            if not parent.stat().st_mode & 0o001:
                raise BenchError(
                    f"{parent} is not searchable by others (mode {parent.stat().st_mode & 0o7777:o}): "
                    "Postfix's daemons run as user postfix and must reach the queue directory; "
                    "use a work directory under /tmp"
                )
        for sub in (self.config_dir, self.queue_dir, self.data_dir):
            sub.mkdir(exist_ok=True)
        os.chmod(self.queue_dir, 0o755)
        # data_directory must belong to mail_owner; `postfix check` (post-install) fixes the
        # queue subdirectories itself.
        shutil.chown(self.data_dir, user="postfix")
        (self.config_dir / "main.cf").write_text(
            _MAIN_CF.format(
                etc=self.config_dir,
                spool=self.queue_dir,
                data=self.data_dir,
                maillog=self.log_path,
                root=self.root,
                loopback=LOOPBACK,
                sink_port=self.sink_port,
            )
        )
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(listen=f"{LOOPBACK}:{self.listen_port}"))

    def _run(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c CONFIG_DIR ARGS`` and return its result."""
        argv = [self.postfix, "-c", str(self.config_dir), *args]
        done = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise BenchError(
                f"`{' '.join(argv)}` failed with status {done.returncode}:\n{done.stdout.strip()}\n"
                f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
            )
        return done

    def check(self) -> str:
        """Run ``postfix -c DIR check``; raise if it fails, return its output (warnings)."""
        return self._run("check").stdout.strip()

    def param(self, name: str) -> str:
        """The value of a main.cf parameter as this instance sees it (``postconf -c DIR -h``)."""
        return tool_output([self.postconf, "-c", str(self.config_dir), "-h", name])

    def defaults_note(self) -> str:
        """:data:`POSTFIX_DEFAULTS_NOTE` filled with this instance's actual values."""
        return POSTFIX_DEFAULTS_NOTE.format(
            dcl=self.param("default_destination_concurrency_limit"),
            idc=self.param("initial_destination_concurrency"),
            dpl=self.param("default_process_limit"),
            ifd=self.param("in_flow_delay"),
            cc=self.param("smtp_connection_cache_on_demand"),
        )

    # Lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Write the config, check it, start the instance and wait for its smtpd port."""
        self.write_config()
        self.check()
        self.started = True  # from here on, stop() must run whatever happens
        self._run("start")
        self._master_pgid = self.master_pid()
        wait_for_port(self.listen_port, timeout=timeout)

    def master_pid(self) -> int | None:
        """The running master's pid, or None."""
        try:
            pid = int(self.master_pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the instance: ``postfix stop``, then ``postfix abort``, then SIGKILL; never raises.

        Postfix's daemons live in the master's process group; if the master died (or had to be
        killed) they are orphaned, so whatever is left of that group is terminated too.
        """
        if not self.started:
            return
        pid = self.master_pid() or self._master_pgid
        with contextlib.suppress(Exception):
            self._run("stop", check=False, timeout=timeout)
        if pid is not None and not _wait_gone(pid, timeout):
            with contextlib.suppress(Exception):
                self._run("abort", check=False, timeout=timeout)
            if not _wait_gone(pid, 5.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._master_pgid is not None:
            _stop_group(self._master_pgid)
        self.started = False

    def queue_counts(self) -> dict[str, int]:
        """Number of queue files in each queue (``incoming``, ``active``, ``deferred``, ...)."""
        counts: dict[str, int] = {}
        for queue in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"):
            qdir = self.queue_dir / queue
            counts[queue] = sum(len(files) for _, _, files in os.walk(qdir)) if qdir.is_dir() else 0
        return counts

    def log_summary(self) -> dict[str, Any]:
        """Delivery outcomes in the maillog (``status=sent`` / ``deferred`` / ...) and warnings.

        ``warning_samples`` holds up to five distinct warning/error texts (without timestamp,
        process id or queue id) so that odd runs can be explained from the report alone.
        """
        counts = {"sent": 0, "deferred": 0, "bounced": 0, "expired": 0, "warnings": 0, "errors": 0}
        samples: list[str] = []
        if self.log_path.exists():
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    for status in ("sent", "deferred", "bounced", "expired"):
                        if f" status={status} " in line:
                            counts[status] += 1
                    kind = "warnings" if "warning:" in line else None
                    if "fatal:" in line or "panic:" in line or " error:" in line:
                        kind = "errors"
                    if kind:
                        counts[kind] += 1
                        text = _QUEUE_ID.sub("", line.split(": ", 1)[-1].strip())
                        if len(samples) < 5 and text not in samples:
                            samples.append(text)
        return {**counts, "warning_samples": samples}

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _stop_group(pgid: int, timeout: float = 5.0) -> None:
    """SIGTERM what is left of process group ``pgid``, then SIGKILL it after ``timeout``.

    Linux does not reuse a pid while it is a live process group id, so the group can only hold
    this instance's processes.
    """
    if not _group_exists(pgid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_exists(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` no longer exists; True if it is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        time.sleep(0.05)
    return False
