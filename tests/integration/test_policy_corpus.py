"""The corpus of policy files (tests/policies/): every bad one refused naming the file, every good one used.

``mxgate policy validate`` (a real process) refuses each bad file with lines that start with the file's
path, and ``mxgate controller --once`` refuses each at start-up with exit status 2 and one line; neither
ever prints a traceback. And the places that read policies agree on every file, the examples included:
the validator, the controller's directory loader, the gateway (the policy as it comes back from Redis, and
everything that uses it: tests/support/policy_use.py) and the operator (the document as the API server
would hand it over). The API server's side is in tests/cluster/test_crd_cluster.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mxgate.errors import PolicyError
from mxgate.policy import ProviderPolicy, parse_policy
from mxgate.policy_files import MAX_FILE_BYTES, PolicyLoader, load_policy_dir, load_policy_file
from support.policy_corpus import REFUSALS, bad_files, good_files
from support.policy_use import use_in_the_gateway, use_in_the_operator
from support.procs import run_mxgate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted([*ROOT.glob("examples/*/*.yaml"), *ROOT.glob("deploy/helm/mxgate/files/policies/*.yaml")])


def test_every_bad_file_says_why_it_is_there() -> None:
    assert {p.name for p in bad_files()} == set(REFUSALS)
    assert len(good_files()) >= 5


def test_validate_refuses_every_bad_file_naming_it() -> None:
    files = bad_files()
    result = run_mxgate("policy", "validate", *(str(p) for p in files))
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    for path in files:
        mine = [line for line in lines if line.startswith((f"{path}: ", f"{path}["))]
        assert mine, f"nothing about {path.name} in:\n{result.stderr}"
        assert any(REFUSALS[path.name].fragment in line for line in mine), (path.name, mine)
        field = REFUSALS[path.name].field
        assert field is None or any(field in line for line in mine), (path.name, mine)
    assert all(line.startswith(tuple(str(p) for p in files)) for line in lines), lines


def test_validate_accepts_every_good_file_and_the_examples() -> None:
    files = [*good_files(), *EXAMPLES]
    result = run_mxgate("policy", "validate", *(str(p) for p in files))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    for path in files:
        assert f"{path}: " in result.stdout


@pytest.mark.parametrize("path", bad_files(), ids=lambda p: p.name)
def test_controller_refuses_a_bad_file_at_start_up(path: Path, tmp_path: Path) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    shutil.copy(path, directory / path.name)
    # Redis is never reached: the files are read first, and a bad one ends the start with exit status 2.
    result = run_mxgate("controller", "--once", "--redis-url", "redis://127.0.0.1:1", "--policies", str(directory))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mxgate: error: {directory / path.name}") and REFUSALS[path.name].fragment in lines[0]


def test_a_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    result = run_mxgate("policy", "validate", str(big))
    assert result.returncode == 1
    assert result.stderr == f"{big}: larger than {MAX_FILE_BYTES // 1024} KiB: not a policy file\n"


def verdict(load: Callable[[], list[ProviderPolicy]]) -> list[ProviderPolicy] | str:
    try:
        return load()
    except PolicyError as exc:
        return str(exc)


@pytest.mark.parametrize("path", [*bad_files(), *good_files(), *EXAMPLES], ids=lambda p: p.name)
def test_validator_controller_gateway_and_operator_agree(path: Path, tmp_path: Path) -> None:
    validator = verdict(lambda: load_policy_file(path))
    directory = tmp_path / "policies"
    directory.mkdir()
    shutil.copy(path, directory / path.name)
    controller = verdict(lambda: load_policy_dir(directory))
    if isinstance(validator, str):
        assert path.name in REFUSALS, f"{path.name} is refused: {validator}"
        assert isinstance(controller, str)
        assert controller == validator.replace(str(path), str(directory / path.name))
    else:
        assert path.name not in REFUSALS, f"{path.name} should be refused"
        assert controller == validator
        for policy in validator:
            use_in_the_gateway(policy)      # includes the JSON round trip through Redis
            use_in_the_operator(policy)
    refusal = REFUSALS.get(path.name)
    if refusal is None or refusal.kind in ("model", "python"):
        # The operator validates the object as the API server stores it, JSON (kubectl turns the YAML into
        # JSON; dates stay strings): the same verdict.
        documents = [json.loads(json.dumps(d)) for d in yaml.load_all(path.read_text(encoding="utf-8-sig"),
                                                                       Loader=PolicyLoader) if d is not None]
        operator = verdict(lambda: [parse_policy(d, source=str(path)) for d in documents])
        assert operator == validator
