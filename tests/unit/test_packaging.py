"""The operator folder must never shadow the standard library's ``operator`` module."""

from __future__ import annotations

import operator
import subprocess
import sys
from pathlib import Path

import mxgate
import mxgate_operator

ROOT = Path(__file__).resolve().parents[2]


def test_stdlib_operator_intact_in_the_same_process() -> None:
    assert operator.itemgetter(1)([0, 42]) == 42
    assert Path(operator.__file__).name == "operator.py"
    assert "site-packages" not in operator.__file__ and str(ROOT / "operator") not in operator.__file__
    assert mxgate_operator.__name__ == "mxgate_operator"
    assert mxgate.__name__ == "mxgate"


def test_stdlib_operator_intact_with_repository_root_first_on_path() -> None:
    # `python -c` run from the repository root puts '' (the root) first on sys.path: the worst case.
    code = (
        "import operator, mxgate_operator, mxgate; "
        "assert hasattr(operator, 'itemgetter'), operator; print(operator.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("operator.py")
    assert str(ROOT) not in out.stdout


async def test_async_tests_run_on_uvloop_like_the_gateway() -> None:
    import asyncio

    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
