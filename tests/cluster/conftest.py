"""Fixtures for tests against a real kube-apiserver: ``kube``, ``namespace`` and ``crds_installed``.

Their interface is documented in ``tests/support/kubeapi.py``; other cluster tests rely on it, so extend it
rather than change it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import pytest

from support.kubeapi import REPO_ROOT, KubeAPI, find_bin_dir

CRDS_DIR = REPO_ROOT / "crds"


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeAPI]:
    """etcd + kube-apiserver for the whole session, stopped (apiserver first) and removed at its end."""
    with KubeAPI.start(find_bin_dir()) as api:
        yield api


@pytest.fixture(scope="session")
def crds_installed(kube: KubeAPI) -> list[str]:
    """Every CRD in the top-level crds/ applied and Established; the CRD names."""
    return kube.apply_crds(sorted(CRDS_DIR.glob("*.yaml")))


@pytest.fixture
def namespace(kube: KubeAPI, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test (a DNS label: at most 63 characters)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:50].rstrip("-")
    name = f"{stem}-{secrets.token_hex(3)}"
    kube.create_namespace(name)
    yield name
    kube.delete_namespace(name)
