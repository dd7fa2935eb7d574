# syntax=docker/dockerfile:1
# popsync container image: a non-root POP3-to-Maildir sync daemon.
#   docker build -t popsync .
#   docker run -d --name popsync -v ./config:/config:ro -v popsync-data:/data popsync
# See docs/deployment.md ("Running in Docker").

# --- build: turn the source tree into a wheel (plus wheels of its dependencies) ---
FROM python:3.12-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY popsync ./popsync
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: a venv with only the wheels, no compilers, no source ---
FROM python:3.12-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="popsync" \
      org.opencontainers.image.description="POP3-to-Maildir sync daemon: exactly-once delivery" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12-slim-bookworm"

# A fixed uid/gid, so bind-mounted Maildirs can be chowned to it on the host.
RUN groupadd --system --gid 10001 popsync \
 && useradd --system --uid 10001 --gid popsync --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin popsync \
 && mkdir -p /config /data/state /data/mail \
 && chown popsync:popsync /data /data/state /data/mail \
 && chmod 0700 /data/state

# The wheels are bind-mounted from the build stage, so they never land in a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/popsync \
 && /opt/popsync/bin/pip install --no-cache-dir --no-index --find-links=/wheels /wheels/popsync-*.whl

ENV PATH=/opt/popsync/bin:$PATH \
    POPSYNC_CONFIG=/config/config.toml \
    STATE_DIRECTORY=/data/state \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# /config: config.toml and password files (mount read-only). /data: state/ and mail/.
VOLUME ["/config", "/data"]
WORKDIR /data
USER 10001:10001

# SIGTERM abandons the message in flight cleanly (nothing lost, nothing half-recorded)
# and exits within Docker's default 10 s grace period.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=60s --timeout=15s --start-period=60s --retries=3 \
    CMD ["popsync", "healthcheck"]

# stdout is not a TTY here, so logs are JSON lines (`docker logs popsync | jq`).
ENTRYPOINT ["popsync"]
CMD ["-c", "/config/config.toml"]
