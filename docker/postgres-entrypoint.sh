#!/bin/sh
# First start: initdb with POSTGRES_USER as the superuser and POSTGRES_PASSWORD as its password
# (scram-sha-256 over the network, trust only on the container's own socket), then
# POSTGRES_DB. Every start: the server on all addresses, in the foreground, as postgres.
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres: POSTGRES_PASSWORD must be set for the first start" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 > /dev/null
    rm -f "$pwfile"
    printf '%s\n' 'host all all all scram-sha-256' >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        # A server on the socket only, so nothing connects before the database exists.
        pg_ctl --silent --wait --options="-c listen_addresses=''" start
        printf 'CREATE DATABASE :"db";\n' |
            psql --quiet --no-psqlrc --set=ON_ERROR_STOP=1 --username="$POSTGRES_USER" \
                --dbname=postgres --set=db="$POSTGRES_DB"
        pg_ctl --silent --wait --mode=fast stop
    fi
    echo "postgres: initialised $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
fi

if [ "${1:-}" = postgres ]; then
    shift
    exec postgres -c listen_addresses='*' "$@"
fi
exec "$@"
