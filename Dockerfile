# syntax=docker/dockerfile:1
#
# gradserve server image (README.md, "Deploy").
#   CPU:          docker build -t gradserve .
#   NVIDIA GPUs:  docker build --build-arg VARIANT=cuda12 -t gradserve:cuda12 .
# VARIANT names a pyproject extra (cuda12, cuda13) that adds JAX's CUDA wheels; they bundle the
# CUDA libraries, so the slim base serves both and the host needs only the NVIDIA driver and
# the NVIDIA container toolkit.
#
# The server binds 0.0.0.0 here, so it refuses to start without API keys: pass
# GRADSERVE_API_KEYS (or GRADSERVE_API_KEYS_FILE) at run time, never at build time.

# The lock (constraints.txt) was tested on CPython 3.11.
ARG PYTHON_VERSION=3.11

# ---- build: a virtual environment holding gradserve and its server dependencies -------------
# Every package at the version CI tested (constraints.txt), the CUDA wheels of each variant too.
FROM python:${PYTHON_VERSION}-slim AS build

ARG VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/gradserve
ENV PATH=/opt/gradserve/bin:$PATH

WORKDIR /src
# Only what the wheel needs, so editing tests or docs does not invalidate this layer.
COPY pyproject.toml README.md constraints.txt ./
COPY client/ client/
COPY service/ service/
COPY gradserve/ gradserve/
RUN extras=server; \
    if [ "$VARIANT" != cpu ]; then extras="server,$VARIANT"; fi; \
    pip install --no-cache-dir -c constraints.txt "/src[$extras]"

# ---- runtime: the environment, a non-root user, nothing else --------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="gradserve" \
      org.opencontainers.image.description="Remote JAX derivatives over HTTP (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid, so a bind-mounted models folder or cache can be granted to it on the host.
RUN groupadd --system --gid 10001 gradserve \
    && useradd --system --uid 10001 --gid gradserve --create-home --home-dir /home/gradserve gradserve \
    && mkdir -p /models /home/gradserve/.cache/gradserve \
    && chown -R gradserve:gradserve /home/gradserve/.cache

COPY --from=build /opt/gradserve /opt/gradserve

ENV PATH=/opt/gradserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GRADSERVE_PORT=8000

# Numeric, so runtimes that check for a non-root user (Kubernetes runAsNonRoot) can tell.
USER 10001:10001
WORKDIR /home/gradserve
# The persistent JAX compile cache lives under ~/.cache/gradserve: mount a volume there so
# restarts skip recompiling (docker-compose.yml does).
VOLUME ["/home/gradserve/.cache/gradserve"]
EXPOSE 8000

# /readyz: 200 once every model is loaded and warmed (and 503 while draining), so the
# container turns healthy only when it can answer. No curl in a slim image: Python's urllib.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('GRADSERVE_PORT', '8000'), timeout=4)"]

# Settings come from GRADSERVE_* variables (service/settings.py); keys from GRADSERVE_API_KEYS.
ENTRYPOINT ["gradserve"]
CMD ["serve", "--host", "0.0.0.0"]
