# PostgreSQL 15 from Debian's packages, for machines without an image registry
# (scripts/docker-smoke.sh). Honours what docker-compose.yml uses of the official postgres image:
# POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB on first start, data in
# /var/lib/postgresql/data, password auth over the network, pg_isready.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# The uid/gid the official image uses, made before the package would pick one: a numeric USER.
# No cluster from the package's own scripts: the entrypoint makes one on first start.
# Versions are not pinned: the base's apt sources decide them, and security updates move them.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql --shell /bin/bash postgres \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-common \
    && sed -ri 's/#(create_main_cluster) .*$/\1 = false/' /etc/postgresql-common/createcluster.conf \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data \
    && chmod 2777 /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER 999:999
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
