"""The ``mxgate`` command line as an operator meets it: real processes, real ports, real files.

Configuration errors exit 2 with one ``mxgate: error: ...`` line and start nothing; ``mxgate policy
validate`` exits 1 when a file is invalid; nothing ever ends in a Python traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mxgate.embedded_redis import EmbeddedRedis, free_port
from mxgate.ingress.auth import Credentials
from support.gateway import policy, policy_yaml
from support.procs import alive, run_mxgate

GOOD = policy_yaml(policy("microsoft", domains=["outlook.test"], route=["127.0.0.1:2600"], maxConnections=5))
BAD_VALUE = GOOD.replace("maxConnections: 5", "maxConnections: 0")
BAD_FIELD = GOOD.replace("maxConnections: 5", "maxConection: 5")
UNREACHABLE = "redis://127.0.0.1:1"


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a human reads: stderr without the JSON log lines, which must be exactly one line."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "microsoft.yaml").write_text(GOOD)
    return directory


@pytest.fixture
def bad_policies(tmp_path: Path) -> Path:
    directory = tmp_path / "bad-policies"
    directory.mkdir()
    (directory / "microsoft.yaml").write_text(BAD_VALUE)
    return directory


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def redis_servers_in(data_dir: Path) -> list[int]:
    """Pids of live redis-server processes working in ``data_dir`` (to prove ``mxgate dev`` left none behind).

    redis-server rewrites its command line, but it runs with ``--dir`` as its working directory.
    """
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "redis-server" \
                    and Path(os.readlink(proc / "cwd")) == data_dir and alive(int(proc.name)):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


# -- Redis URL -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:6379", "expected one of redis://, rediss://, unix://, redis+sentinel://"),
    ("redis://127.0.0.1:notaport", "Port could not be cast to integer"),
    ("redis://127.0.0.1:99999", "Port out of range"),
    ("redis+sentinel://127.0.0.1:26379", "name the primary as the sentinels know it"),
    ("redis+cluster://127.0.0.1:7000/3", "a cluster URL has no path"),
    ("redis+cluster://127.0.0.1", "'127.0.0.1' is not HOST:PORT"),
])
def test_bad_redis_url_is_a_config_error(url: str, message: str) -> None:
    result = run_mxgate("gateway", "--redis-url", url, "--listen", f"127.0.0.1:{free_port()}",
                        "--metrics-listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"mxgate: error: --redis-url {url!r}: ") and message in line


def test_missing_redis_url_is_a_config_error() -> None:
    result = run_mxgate("gateway", env={"MXGATE_REDIS_URL": ""})
    assert result.returncode == 2
    assert error_line(result) == "mxgate: error: --redis-url is required (or set MXGATE_REDIS_URL)"


def test_controller_reports_an_unreachable_redis(policies: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    result = run_mxgate("controller", "--redis-url", url, "--policies", str(policies), "--once")
    assert result.returncode == 2
    assert error_line(result).startswith(f"mxgate: error: cannot reach Redis at {url}: ")


def test_controller_once_publishes(policies: Path, redis_server: EmbeddedRedis) -> None:
    result = run_mxgate("controller", "--redis-url", redis_server.url, "--policies", str(policies), "--once")
    assert result.returncode == 0, result.stderr
    assert '"policies published"' in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real redis-server that demands a password with characters a URL would mangle; (url, password)."""
    port, password = free_port(), "p@ss:w/rd#1%?"
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--requirepass", password, "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", password
    finally:
        server.kill()
        server.wait()


def test_redis_password_from_a_file(policies: Path, tmp_path: Path, redis_with_password: tuple[str, str]) -> None:
    url, password = redis_with_password
    secret = tmp_path / "redis-password"
    secret.write_text(password + "\n")   # as a Secret mounted from `kubectl create secret --from-file` may have
    ok = run_mxgate("controller", "--redis-url", url, "--policies", str(policies), "--once",
                    env={"MXGATE_REDIS_PASSWORD_FILE": str(secret)})
    assert ok.returncode == 0, ok.stderr
    without = run_mxgate("controller", "--redis-url", url, "--policies", str(policies), "--once")
    assert without.returncode == 2 and "cannot reach Redis" in error_line(without)
    secret.write_text("wrong")
    wrong = run_mxgate("controller", "--redis-url", url, "--policies", str(policies), "--once",
                       "--redis-password-file", str(secret))
    assert wrong.returncode == 2 and "cannot reach Redis" in error_line(wrong)
    assert "wrong" not in wrong.stderr   # the password is never printed


@pytest.mark.parametrize(("content", "message"), [(None, "cannot read"), ("\n", "the file is empty")])
def test_unusable_redis_password_file(tmp_path: Path, content: str | None, message: str) -> None:
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    result = run_mxgate("status", "--redis-url", "redis://127.0.0.1:6379", "--redis-password-file", str(secret))
    assert result.returncode == 2
    assert error_line(result).startswith(f"mxgate: error: --redis-password-file {secret}: {message}")


def test_operator_needs_a_namespace() -> None:
    result = run_mxgate("operator", "--redis-url", "redis://127.0.0.1:6379", env={"POD_NAMESPACE": ""})
    assert result.returncode == 2
    assert error_line(result) == "mxgate: error: --namespace is required (or set POD_NAMESPACE)"


# -- policies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["controller", "dev"])
def test_missing_policies_directory(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    args = ["--data-dir", str(tmp_path / "data")] if command == "dev" else ["--redis-url", UNREACHABLE]
    result = run_mxgate(command, "--policies", str(missing), *args)
    assert result.returncode == 2
    assert error_line(result) == f"mxgate: error: {missing}: not a directory"
    assert not (tmp_path / "data").exists()  # dev started nothing


@pytest.mark.parametrize("command", ["controller", "dev"])
def test_invalid_policy_file_names_file_and_field(command: str, tmp_path: Path, bad_policies: Path) -> None:
    args = ["--data-dir", str(tmp_path / "data")] if command == "dev" else ["--redis-url", UNREACHABLE]
    result = run_mxgate(command, "--policies", str(bad_policies), *args)
    assert result.returncode == 2
    assert error_line(result) == (f"mxgate: error: {bad_policies / 'microsoft.yaml'}: "
                                  "spec.limits.maxConnections: Input should be greater than or equal to 1")
    assert not (tmp_path / "data").exists()


def test_policy_validate(tmp_path: Path) -> None:
    good, bad_value, bad_field = tmp_path / "good.yaml", tmp_path / "value.yaml", tmp_path / "field.yaml"
    good.write_text(GOOD)
    bad_value.write_text(BAD_VALUE)
    bad_field.write_text(BAD_FIELD)

    ok = run_mxgate("policy", "validate", str(good))
    assert ok.returncode == 0 and ok.stdout == f"{good}: microsoft: ok\n" and ok.stderr == ""

    mixed = run_mxgate("policy", "validate", str(good), str(bad_value), str(bad_field),
                       str(tmp_path / "none.yaml"))
    assert mixed.returncode == 1
    assert mixed.stdout == f"{good}: microsoft: ok\n"
    assert mixed.stderr.splitlines() == [
        f"{bad_value}: spec.limits.maxConnections: Input should be greater than or equal to 1",
        f"{bad_field}: spec.limits.maxConection: Extra inputs are not permitted",
        f"{tmp_path / 'none.yaml'}: cannot read: No such file or directory",
    ]


def test_policy_validate_names_the_warmup_field_at_fault(tmp_path: Path) -> None:
    warmup = ("  warmup:\n    startDate: {start}\n    schedule:\n"
              "    - {{day: 1, messagesPerDay: 200}}\n    - {{day: {day}, messagesPerDay: {volume}}}\n")
    files = {name: tmp_path / f"{name}.yaml" for name in ("good", "order", "down", "date")}
    for name, (start, day, volume) in {"good": ("2026-11-01", 3, 500), "order": ("2026-11-01", 1, 500),
                                       "down": ("2026-11-01", 3, 100), "date": ("2026-11-31", 3, 500)}.items():
        files[name].write_text(GOOD + warmup.format(start=start, day=day, volume=volume))

    result = run_mxgate("policy", "validate", *(str(f) for f in files.values()))
    assert result.returncode == 1 and result.stdout == f"{files['good']}: microsoft: ok\n"
    assert result.stderr.splitlines() == [
        f"{files['order']}: spec.warmup.schedule: Value error, schedule[1].day must be greater than "
        "schedule[0].day (1)",
        f"{files['down']}: spec.warmup.schedule: Value error, schedule[1].messagesPerDay must not be less than "
        "schedule[0].messagesPerDay (200): a ramp goes up",
        f"{files['date']}: spec.warmup.startDate: Input should be a valid date or datetime, day value is outside "
        "expected range",
    ]


# -- ports -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["smtp", "metrics"])
def test_gateway_port_in_use(which: str, busy_port: int, redis_server: EmbeddedRedis) -> None:
    smtp, metrics = (busy_port, free_port()) if which == "smtp" else (free_port(), busy_port)
    result = run_mxgate("gateway", "--redis-url", redis_server.url, "--listen", f"127.0.0.1:{smtp}",
                        "--metrics-listen", f"127.0.0.1:{metrics}", timeout=60)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"mxgate: error: cannot listen on 127.0.0.1:{busy_port}: ") and "in use" in line


def test_dev_port_in_use_stops_its_redis(busy_port: int, tmp_path: Path, policies: Path) -> None:
    data = tmp_path / "data"
    result = run_mxgate("dev", "--policies", str(policies), "--data-dir", str(data),
                        "--listen", f"127.0.0.1:{busy_port}", "--metrics-listen", f"127.0.0.1:{free_port()}",
                        timeout=60)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"mxgate: error: cannot listen on 127.0.0.1:{busy_port}: ") and "in use" in line
    assert redis_servers_in(data.resolve()) == []


def test_bad_listen_address_is_a_usage_error() -> None:
    result = run_mxgate("gateway", "--redis-url", UNREACHABLE, "--listen", "nonsense")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "mxgate gateway: error: argument --listen: 'nonsense': expected HOST:PORT")
    assert "Traceback" not in result.stderr


# -- passwd ----------------------------------------------------------------------------------------------


def test_passwd_reads_the_password_from_stdin(tmp_path: Path) -> None:
    result = run_mxgate("passwd", "orders-app", stdin="correct horse battery staple\n")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert result.stdout.count("\n") == 1 and line.startswith("orders-app:$argon2id$")
    assert PasswordHasher().verify(line.partition(":")[2], "correct horse battery staple")
    credentials = tmp_path / "credentials"
    credentials.write_text(result.stdout)
    assert set(Credentials.load(credentials).users) == {"orders-app"}  # the line is a valid credentials file


@pytest.mark.parametrize(("user", "stdin", "message"), [
    ("orders-app", "short\n", "use a password of at least 12 characters"),
    ("orders-app", "", "use a password of at least 12 characters"),
    ("orders:app", "correct horse battery staple\n", "user names must be non-empty and must not contain ':'"),
])
def test_passwd_refuses(user: str, stdin: str, message: str) -> None:
    result = run_mxgate("passwd", user, stdin=stdin)
    assert result.returncode == 2 and result.stdout == ""
    assert error_line(result) == f"mxgate: error: {message}"
