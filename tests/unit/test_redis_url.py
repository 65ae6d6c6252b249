"""``--redis-url``: every scheme parses to what redis-py needs; bad URLs are refused naming the problem, never
the password."""

from __future__ import annotations

import pytest

from mxgate.errors import ConfigError
from mxgate.redisconn import parse_redis_url, redact, url_with_password


@pytest.mark.parametrize(("url", "mode", "nodes", "master", "db", "password", "tls"), [
    ("redis://127.0.0.1:6379/0", "single", (), "", 0, None, False),
    ("redis://:s3cret@redis:6379/2", "single", (), "", 2, "s3cret", False),
    ("rediss://user:pw@redis.example:6380", "single", (), "", 0, "pw", True),
    ("unix:///run/redis.sock?db=3", "single", (), "", 3, None, False),
    ("redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster", "sentinel",
     (("s1", 26379), ("s2", 26379), ("s3", 26379)), "mymaster", 0, None, False),
    ("redis+sentinel://:p%40ss@10.0.0.1:26379/mxgate/4", "sentinel", (("10.0.0.1", 26379),), "mxgate", 4,
     "p@ss", False),
    ("rediss+sentinel://[::1]:26379/m", "sentinel", (("::1", 26379),), "m", 0, None, True),
    ("redis+cluster://n1:7000,n2:7001", "cluster", (("n1", 7000), ("n2", 7001)), "", 0, None, False),
    ("redis+cluster://default:pw@n1:7000/", "cluster", (("n1", 7000),), "", 0, "pw", False),
])
def test_schemes(url: str, mode: str, nodes: tuple[tuple[str, int], ...], master: str, db: int,
                 password: str | None, tls: bool) -> None:
    target = parse_redis_url(url)
    assert (target.mode, target.nodes, target.master, target.db, target.password, target.tls) == (
        mode, nodes, master, db, password, tls)
    if password:
        assert password not in target.redacted and "***" in target.redacted
        assert password not in repr(target)


@pytest.mark.parametrize(("url", "says"), [
    ("http://x:1", "expected one of"),
    ("redis//x:1", "expected one of"),
    ("redis+sentinel://s1:26379", "name the primary"),
    ("redis+sentinel://s1:26379/m/x", "not a database number"),
    ("redis+sentinel://s1:26379/m/1/2", "expected /MASTER[/DB]"),
    ("redis+sentinel://s1/m", "is not HOST:PORT"),
    ("redis+cluster://n1:99999", "no valid port"),
    ("redis+cluster://n1:7000/0", "has no path"),
    ("redis+cluster://", "no HOST:PORT"),
    ("redis://:topsecret@h:notaport/0", "--redis-url"),
])
def test_bad_urls_name_the_problem_not_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_redis_url(url.replace("topsecret", "topsecret"))
    assert says in str(caught.value)
    assert "topsecret" not in str(caught.value)


@pytest.mark.parametrize(("text", "shown"), [
    ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
    ("cannot reach redis+sentinel://u:pw@a:1,b:2/m now", "cannot reach redis+sentinel://u:***@a:1,b:2/m now"),
    ("unix:///s.sock?db=1&password=pw&x=1", "unix:///s.sock?db=1&password=***&x=1"),
    ("redis://h:1/0", "redis://h:1/0"),
])
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_password_from_a_file_replaces_the_urls() -> None:
    target = parse_redis_url("redis+sentinel://:old@s1:26379/m").with_password("new:pw/@")
    assert target.password == "new:pw/@" and target.nodes == (("s1", 26379),)
    assert url_with_password("redis://:old@h:1/0", "a/b@c") == "redis://:a%2Fb%40c@h:1/0"
    assert parse_redis_url(url_with_password("redis://h:1/0", "a/b@c")).password == "a/b@c"
