#!/bin/sh
# Like the official image: arguments that start with "-" are options of redis-server, and the
# server listens on every address with protected mode off (it publishes no host port; the
# compose network is its boundary).
set -eu
if [ "${1#-}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
    shift
    set -- redis-server --bind '* -::*' --protected-mode no --dir /data "$@"
fi
exec "$@"
