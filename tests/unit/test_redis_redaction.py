"""Review of issue 9: a password that ``parse_redis_url`` accepts must never be shown by ``redacted`` (which the
gateway logs at start: "gateway started" ... redis=<redacted>) nor by the ConfigError of a refused URL."""

from __future__ import annotations

import pytest

from mxgate.errors import ConfigError
from mxgate.redisconn import parse_redis_url


@pytest.mark.parametrize("url", [
    "redis+sentinel://:pa/ss@s1:26379/mymaster",      # a '/' in the password (parsed: password 'pa/ss')
    "redis+cluster://:pa/ss@n1:7000",
    "redis+sentinel://u:p@ss@s1:26379/mymaster",      # an unquoted '@' (parsed: password 'p@ss')
    "redis+sentinel://s3cret@s1:26379/mymaster",      # no ':' (parsed as the password, not a user name)
    "redis+cluster://s3cret@n1:7000",
    "redis://user:se cret@h:6379/0",                  # a space (redis-py takes it)
])
def test_redacted_never_shows_an_accepted_password(url: str) -> None:
    target = parse_redis_url(url)
    assert target.password
    assert target.password not in target.redacted, f"{target.redacted!r} shows the password {target.password!r}"
    # not even a part of it
    for piece in (target.password[:3], target.password[-3:]):
        assert piece not in target.redacted.replace("***", ""), f"{target.redacted!r} shows {piece!r}"


@pytest.mark.parametrize("url", [
    "redis://:sec ret@h:99999/0",
    "redis+sentinel://:t/psecret@s1:notaport/m",
])
def test_a_refused_url_never_shows_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_redis_url(url)
    assert "ret" not in str(caught.value) and "psecret" not in str(caught.value), str(caught.value)
