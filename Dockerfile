# One image for every mxgate process: `mxgate gateway` (the default command) and `mxgate operator`.
#
#   docker build -t REGISTRY/mxgate:0.1.0 .
#
# Stage 1 builds mxgate's wheel and installs it, with its dependencies, into a virtualenv; stage 2 is a clean
# python:slim with only that virtualenv copied in: no compiler, no pip cache, no source tree. It runs as the
# non-root user 10001 (the Helm chart's runAsUser) and works with a read-only root filesystem.
# Without a Docker engine, `bash .ci/image` builds this same file with buildah on a Debian bookworm base made
# by debootstrap (PYTHON_IMAGE set to it; Debian's python3 linked where the official image keeps it) and
# writes an OCI archive; the test command does that and runs the image in a real single-node cluster
# (tests/e2e). hadolint checks this file in the lint step.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY operator ./operator
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/mxgate \
 && /opt/mxgate/bin/pip install --no-cache-dir /wheels/mxgate-*.whl \
 && /opt/mxgate/bin/pip uninstall --yes pip setuptools \
 && /opt/mxgate/bin/mxgate --version

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="mxgate" \
      org.opencontainers.image.description="Outbound SMTP gateway that keeps a fleet of senders inside each mailbox provider's connection and rate limits" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
# A named user, not just a uid: without $POD_ID, kopf names its peering identity after getpass.getuser(),
# which needs a passwd entry.
RUN groupadd --system --gid 10001 mxgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mxgate
# The virtualenv's python links to /usr/local/bin/python3.11, the same path in both stages.
COPY --from=builder /opt/mxgate /opt/mxgate
# No .pyc writes (the root filesystem is read-only in the chart); logs unbuffered to the container runtime.
ENV PATH=/opt/mxgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
# SMTP (the chart's Service maps 25 and 587 here), gateway /healthz /readyz /metrics, operator /healthz.
EXPOSE 2525 9325 8080
ENTRYPOINT ["mxgate"]
CMD ["gateway"]
