# clipprune: the API (`clipprune serve`, the default command) and the Celery worker
# (`clipprune worker`) in one image. Any Debian-based image with python3 (>= 3.11) and its venv
# module works as the base: both stages use it, so the venv's interpreter links stay valid.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --upgrade pip
# Dependencies first, in a layer of their own (empty packages stand in for the code), so a
# change to the code or README reinstalls only the package itself.
COPY pyproject.toml ./
RUN mkdir schemas workers service \
    && touch README.md schemas/__init__.py workers/__init__.py service/__init__.py \
    && /opt/venv/bin/python -m pip install . \
    && rm -rf README.md schemas workers service build ./*.egg-info
COPY README.md ./
COPY schemas ./schemas
COPY workers ./workers
COPY service ./service
RUN /opt/venv/bin/python -m pip install --no-deps --force-reinstall . \
    && /opt/venv/bin/clipprune --help > /dev/null

FROM ${BASE_IMAGE}
ARG UID=10001
# A numeric user (Kubernetes' runAsNonRoot can check it) that owns only the data directory.
RUN groupadd --system --gid "${UID}" clipprune \
    && useradd --system --uid "${UID}" --gid "${UID}" --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin clipprune \
    && mkdir /data \
    && chown "${UID}:${UID}" /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLIPPRUNE_DATA_DIR=/data \
    CLIPPRUNE_HOST=0.0.0.0 \
    CLIPPRUNE_PORT=8000
WORKDIR /data
USER ${UID}:${UID}
EXPOSE 8000
# Liveness of the API. The worker overrides it (compose: `clipprune ping-worker`).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('CLIPPRUNE_PORT', '8000'), timeout=4)"]
# One uvicorn process per container; scale with more containers.
CMD ["clipprune", "serve"]
