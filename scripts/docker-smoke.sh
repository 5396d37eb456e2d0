#!/usr/bin/env bash
# The container deployment end to end, on a machine with no image registry (README: Containers).
#
#   a. engine    a Docker engine: the running one, else Debian's docker.io started here
#   b. base      clipprune-base:bookworm from debootstrap (python3, venv, this machine's CA bundle)
#   c. services  Redis and PostgreSQL images built on it (docker/*.Dockerfile)
#   d. app       the project image, --build-arg BASE_IMAGE=clipprune-base:bookworm
#   e. up        docker-compose up with 2 workers, until the api and both workers are healthy
#   f. jobs      a prune and a train job through the API, results checked on this side
#   g. teardown  always: down -v (and the engine stopped, if this script started it)
#
# Each stage prints its duration. Images are kept between runs, so a second run skips the
# debootstrap and reuses the layer cache: `make docker-clean` removes them.
#
# Environment: KEEP_DOCKERD=1 leaves an engine this script started running; DEBIAN_MIRROR,
# DEBIAN_SECURITY_MIRROR; SMOKE_PROJECT (compose project name); SMOKE_TIMEOUT_S (jobs).
# `scripts/docker-smoke.sh --can-run` exits 0 if an engine runs or can be started here, else
# prints why not and exits 1 (.ci/run uses it).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BASE_IMAGE=clipprune-base:$SUITE
REDIS_IMAGE=clipprune-redis:$SUITE
POSTGRES_IMAGE=clipprune-postgres:$SUITE
APP_IMAGE=clipprune:smoke
PROJECT=${SMOKE_PROJECT:-clipprune-smoke}
JOBS_TIMEOUT_S=${SMOKE_TIMEOUT_S:-300}
HEALTH_TIMEOUT_S=180

now() { date +%s.%N; }
log() { printf '[docker-smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() {
    printf 'docker-smoke: stage %s failed: %s\n' "${STAGE:-setup}" "$*" >&2
    exit 1
}

can_run() {
    if docker info > /dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "no Docker engine answers, and starting one needs root"
        return 1
    fi
    if command -v dockerd > /dev/null 2>&1; then
        return 0
    fi
    if ! command -v apt-get > /dev/null 2>&1; then
        echo "no Docker engine answers, no dockerd, and no apt-get to install docker.io"
        return 1
    fi
    # A fresh machine may have no package lists yet: fetch them before saying apt has none.
    # (The policy is read into a variable: under pipefail, `| grep -q` can fail on SIGPIPE.)
    local policy
    policy=$(apt-cache policy docker.io 2> /dev/null || true)
    if [[ $policy != *"Candidate: "[0-9]* ]]; then
        apt-get update -qq
        policy=$(apt-cache policy docker.io 2> /dev/null || true)
    fi
    if [[ $policy == *"Candidate: "[0-9]* ]]; then
        return 0
    fi
    echo "no Docker engine answers, no dockerd, and apt offers no docker.io"
    return 1
}

if [ "${1:-}" = --can-run ]; then
    can_run
    exit
fi

START=$(now)
STAGE=""
STAGE_START=""
TIMES=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/clipprune-smoke.XXXXXX")
DOCKERD_PID=""
DOCKERD_LOG=""
COMPOSE_UP=""
COMPOSE=()

stage() {
    STAGE=$1
    STAGE_START=$(now)
    log "stage $STAGE: $2"
}

stage_done() {
    local seconds
    seconds=$(awk -v a="$STAGE_START" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    TIMES+=("$(printf '%-9s %7s s%s' "$STAGE" "$seconds" "${1:+  $1}")")
    log "stage $STAGE: done in $seconds s${1:+ ($1)}"
}

apt_install() {
    command -v apt-get > /dev/null 2>&1 || fail "need $*, and there is no apt-get to install it"
    log "installing Debian packages: $*"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" > /dev/null
}

# Runs a command with its output in a log file; on failure shows the end of it.
logged() {
    local name=$1
    shift
    if ! "$@" > "$WORK/$name.log" 2>&1; then
        tail -n 40 "$WORK/$name.log" >&2
        fail "$name: '$*' failed (end of its output above)"
    fi
}

compose() { "${COMPOSE[@]}" "$@"; }

cleanup() {
    local rc=$? failed_stage=${STAGE:-setup}
    set +e
    trap - EXIT INT TERM
    if [ -n "$COMPOSE_UP" ]; then
        if [ "$rc" != 0 ]; then
            echo "---- docker-compose ps and logs (last 60 lines per service) ----" >&2
            compose ps >&2
            compose logs --no-color --tail=60 >&2
        fi
        stage teardown "docker-compose down -v"
        compose down -v --remove-orphans > "$WORK/down.log" 2>&1 || cat "$WORK/down.log" >&2
        stage_done
    fi
    if [ -n "$DOCKERD_PID" ]; then
        if [ -n "${KEEP_DOCKERD:-}" ]; then
            log "leaving dockerd (pid $DOCKERD_PID) running; its log: $DOCKERD_LOG"
        else
            log "stopping the dockerd this script started (pid $DOCKERD_PID)"
            kill "$DOCKERD_PID" 2> /dev/null
            for _ in $(seq 1 30); do
                kill -0 "$DOCKERD_PID" 2> /dev/null || break
                sleep 1
            done
            if [ "$rc" = 0 ]; then
                rm -f "$DOCKERD_LOG"
            else
                echo "dockerd's log: $DOCKERD_LOG" >&2
            fi
        fi
    fi
    # debootstrap mounts /proc and /sys in the root it builds; never delete through them.
    awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r mnt; do umount -l "$mnt"; done
    rm -rf --one-file-system "$WORK"
    echo
    echo "docker-smoke: stage times"
    for line in "${TIMES[@]}"; do
        echo "  $line"
    done
    printf '  %-9s %7s s\n' total "$(awk -v a="$START" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
    if [ "$rc" = 0 ]; then
        echo "docker-smoke: passed"
    else
        echo "docker-smoke: FAILED in stage $failed_stage (exit $rc)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$PY" ] || fail "no $PY: run through 'make docker-smoke', which builds .venv"

# ---- a. a Docker engine ---------------------------------------------------------------------
stage engine "a Docker engine"
if docker info > /dev/null 2>&1; then
    stage_done "already running"
else
    reason=$(can_run) || fail "$reason"
    command -v dockerd > /dev/null 2>&1 || apt_install docker.io
    # Containers' traffic leaves through the default route: match its MTU, or large downloads
    # during the builds can stall where the path is narrower than Docker's default 1500.
    iface=$(awk '$2 == "00000000" { print $1; exit }' /proc/net/route)
    mtu=$(cat "/sys/class/net/${iface:-eth0}/mtu" 2> /dev/null || echo 1500)
    DOCKERD_LOG=$(mktemp "${TMPDIR:-/tmp}/clipprune-dockerd.XXXXXX.log")
    log "starting dockerd (mtu $mtu), log in $DOCKERD_LOG"
    dockerd --mtu="$mtu" > "$DOCKERD_LOG" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do
        docker info > /dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2> /dev/null || {
            tail -n 20 "$DOCKERD_LOG" >&2
            DOCKERD_PID=""
            fail "dockerd exited (end of $DOCKERD_LOG above)"
        }
        sleep 1
    done
    docker info > /dev/null 2>&1 || fail "dockerd did not answer within 60 s (log: $DOCKERD_LOG)"
    stage_done "started dockerd, pid $DOCKERD_PID"
fi
if command -v docker-compose > /dev/null 2>&1; then
    COMPOSE=(docker-compose)
elif docker compose version > /dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    apt_install docker-compose
    COMPOSE=(docker-compose)
fi
COMPOSE+=(--project-name "$PROJECT" --project-directory "$ROOT" --file "$ROOT/docker-compose.yml")

# ---- b. the base image ----------------------------------------------------------------------
stage base "$BASE_IMAGE from debootstrap"
if docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    stage_done "exists, skipped"
else
    command -v debootstrap > /dev/null 2>&1 || apt_install debootstrap
    rootfs=$WORK/rootfs
    logged debootstrap debootstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$MIRROR"
    # What an image should not carry: package caches and indexes, this host's name and DNS.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
    cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    # As in Debian's official images: apt in a container keeps no downloaded packages.
    cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    # This machine's CA bundle (it may trust a proxy's CA), and its local CAs, so that a later
    # update-ca-certificates inside an image keeps them.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    if compgen -G '/usr/local/share/ca-certificates/*' > /dev/null; then
        cp -r /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
    fi
    changes=(
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
        --change 'ENV LANG=C.UTF-8'
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt'
        --change 'CMD ["/bin/bash"]'
    )
    # pip settings of this machine that a container can use too (an https index).
    for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT; do
        if [ -n "${!var:-}" ] && [[ "${!var}" != *file://* ]]; then
            changes+=(--change "ENV $var=${!var}")
        fi
    done
    tar --numeric-owner -C "$rootfs" -c . | docker import "${changes[@]}" - "$BASE_IMAGE" > /dev/null \
        || fail "docker import of the debootstrap root failed"
    stage_done "$(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{ printf "%d MB", $1 / 1e6 }')"
fi

# ---- c. Redis and PostgreSQL on that base ---------------------------------------------------
stage services "$REDIS_IMAGE, $POSTGRES_IMAGE"
logged build-redis docker build --tag "$REDIS_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --file docker/redis.Dockerfile docker
logged build-postgres docker build --tag "$POSTGRES_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --file docker/postgres.Dockerfile docker
stage_done

# ---- d. the project image -------------------------------------------------------------------
stage app "$APP_IMAGE, BASE_IMAGE=$BASE_IMAGE"
logged build-app docker build --tag "$APP_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" .
stage_done "$(docker image inspect -f '{{.Size}}' "$APP_IMAGE" | awk '{ printf "%d MB", $1 / 1e6 }')"

# ---- e. the compose stack -------------------------------------------------------------------
stage up "docker-compose up -d --scale worker=2 (project $PROJECT)"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
API_KEY=smoke-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
export CLIPPRUNE_IMAGE=$APP_IMAGE REDIS_IMAGE POSTGRES_IMAGE BASE_IMAGE
export CLIPPRUNE_PORT=$PORT CLIPPRUNE_API_KEYS=$API_KEY
POSTGRES_PASSWORD=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
export POSTGRES_PASSWORD
COMPOSE_UP=1
compose down -v --remove-orphans > /dev/null 2>&1 || true # what an interrupted run left
logged compose-up compose up -d --no-build --scale worker=2

# Waits until `want` containers of a service report healthy; fails early if one stops.
wait_healthy() {
    local service=$1 want=$2 deadline=$((SECONDS + HEALTH_TIMEOUT_S)) ids healthy id state
    while :; do
        ids=$(compose ps -q "$service")
        healthy=0
        for id in $ids; do
            state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
            case $state in
                "running healthy") healthy=$((healthy + 1)) ;;
                running*) ;;
                *) fail "a $service container is '$state'" ;;
            esac
        done
        [ "$healthy" -ge "$want" ] && return 0
        [ "$SECONDS" -lt "$deadline" ] || fail "$service: $healthy of $want healthy after ${HEALTH_TIMEOUT_S} s"
        sleep 1
    done
}
wait_healthy redis 1
wait_healthy postgres 1
wait_healthy api 1
wait_healthy worker 2
stage_done "api healthy on 127.0.0.1:$PORT, 2 workers healthy"

# ---- f. jobs through the API ----------------------------------------------------------------
stage jobs "a prune and a train job through http://127.0.0.1:$PORT"
"$PY" scripts/docker_smoke_jobs.py --url "http://127.0.0.1:$PORT" --key "$API_KEY" \
    --workdir "$WORK/jobs" --timeout "$JOBS_TIMEOUT_S" --ids-file "$WORK/job-ids" \
    || fail "the jobs did not pass their checks (above)"
# Which worker container ran which job (the workers log the job id when it ends).
compose logs --no-color worker > "$WORK/worker.log" 2>&1 || true
while read -r kind id; do
    ran=$(grep -F "$id" "$WORK/worker.log" | awk '{ print $1 }' | sort -u | paste -sd " ")
    log "$kind job $id ran on: ${ran:-(not in the worker logs)}"
done < "$WORK/job-ids"
stage_done
