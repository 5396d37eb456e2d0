# Redis from Debian's package, for machines without an image registry (scripts/docker-smoke.sh).
# Behaves like the official redis image where docker-compose.yml relies on it: `redis-server`
# with arguments as the command, data in /data, reachable from other containers, redis-cli.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# The uid/gid the official image uses, made before the package would pick one: a numeric USER.
# Versions are not pinned: the base's apt sources decide them, and security updates move them.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 redis \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
USER 999:999
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["redis-server"]
