"""Fixtures for the end-to-end tests: a real single-node cluster running mxgate's image.

``mxgate_image`` (session) -- :class:`support.kubenode.ImageArchives`: the OCI archives of mxgate
(``$MXGATE_IMAGE_ARCHIVE``, else the last line of ``bash .ci/image``, which builds or finds it in its cache), and
of the pause and Redis images ``.ci/image`` writes beside it; with the names pods use (``imagePullPolicy: Never``).

``cluster`` (session) -- a running :class:`support.kubenode.KubeNode` with those images imported; torn down
completely at the end of the session (its teardown fails the session if it leaves anything on the host).

``namespace`` (function) -- a fresh namespace for the test, deleted afterwards.

A missing prerequisite (root, a binary, a Debian package, the image) fails the tests, saying what to install;
nothing is skipped.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from support.kubeapi import REPO_ROOT, find_bin_dir
from support.kubenode import ImageArchives, KubeNode

IMAGE_SCRIPT = REPO_ROOT / ".ci" / "image"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``) every e2e test goes to one worker: the host has one node."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.xdist_group("kubenode"))


@pytest.fixture(scope="session")
def mxgate_image() -> ImageArchives:
    if configured := os.environ.get("MXGATE_IMAGE_ARCHIVE"):
        archive = Path(configured)
    else:
        result = subprocess.run(["bash", str(IMAGE_SCRIPT)], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=1800)
        lines = result.stdout.strip().splitlines()
        if result.returncode != 0 or not lines:
            pytest.fail(f"{IMAGE_SCRIPT} exited with {result.returncode} (it needs buildah, podman, debootstrap, "
                        f"runc and gcc: Debian packages of those names); stderr:\n{result.stderr[-4000:]}")
        archive = Path(lines[-1])
    images = ImageArchives(mxgate=archive, pause=archive.with_name("pause.oci.tar"),
                           redis=archive.with_name("redis.oci.tar"))
    for path in (images.mxgate, images.pause, images.redis):
        if not path.is_file():
            pytest.fail(f"{path} is missing: run `bash .ci/image` (it writes all three archives)")
    return images


@pytest.fixture(scope="session")
def cluster(mxgate_image: ImageArchives, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeNode]:
    node = KubeNode.start(find_bin_dir(), tmp_path_factory.mktemp("kubenode"), pause=mxgate_image.pause,
                          images=[mxgate_image.mxgate, mxgate_image.redis])
    print(f"\nkubenode: up in {node.timings['start']} s ({node.timings}); logs in {node.logs}")
    try:
        yield node
    finally:
        node.stop()
        print(f"kubenode: torn down in {node.timings['teardown']} s")


@pytest.fixture
def namespace(cluster: KubeNode, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test (a DNS label: at most 63 characters)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    name = f"{stem}-{secrets.token_hex(3)}"
    with cluster.api_client() as api:
        kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    yield name
    with cluster.api_client() as api:
        try:
            kubernetes.client.CoreV1Api(api).delete_namespace(name, grace_period_seconds=0)
        except kubernetes.client.ApiException:
            pass
