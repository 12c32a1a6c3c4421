#!/usr/bin/env bash
# The demo: the whole stack with docker-compose, four runs submitted from the host (one a job
# of the example code location), their progress and final states. Exits 0 when all four end
# as expected.
#
# Sourced (compose/demo-hosts.sh does), it only sets up what every demo shares: credentials,
# certificates, the URLs and the functions above the line that says so; it starts nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${VENV:-.venv}/bin
PROJECT=${HD_DEMO_PROJECT:-hybrid-dispatcher-demo}
log() { echo "[demo] $*"; }

# Credentials: generated once per checkout, kept out of git; a variable already set wins.
CREDENTIALS=${HD_DEMO_ENV_FILE:-compose/demo.env}
if [ ! -f "$CREDENTIALS" ]; then
    (
        umask 077
        {
            echo "# Made by compose/demo.sh on its first run: the demo stack's passwords."
            for name in HD_DEMO_AMQP_PASSWORD HD_DEMO_DB_PASSWORD; do
                echo "$name=$("$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(18))')"
            done
        } >"$CREDENTIALS"
    )
    log "generated the demo's passwords in $CREDENTIALS"
fi
while IFS='=' read -r key value; do
    case "$key" in HD_DEMO_*) [ -n "${!key:-}" ] || export "$key=$value" ;; esac
done <"$CREDENTIALS"
# Certificates: made once per checkout (compose/tls/, kept out of git). The stack speaks TLS only.
"$BIN/python" compose/certs.py compose/tls
CA="$PWD/compose/tls/ca.pem"
COMPOSE=(docker-compose -f compose/docker-compose.yml -p "$PROJECT")
RUN_IMAGE=${HD_IMAGE_RUN_TINY:-hybrid-dispatcher/run-tiny:latest}
# The agent's container runs as an unprivileged user in the Docker socket's group.
export HD_DOCKER_GID=${HD_DOCKER_GID:-$(stat -c %g /var/run/docker.sock)}
export HD_AMQP_URL="amqps://${HD_DEMO_AMQP_USER:-dispatcher}:${HD_DEMO_AMQP_PASSWORD}@127.0.0.1:${HD_DEMO_AMQP_PORT:-5671}/?cafile=$CA"
export HD_DATABASE_URL="postgresql://${HD_DEMO_DB_USER:-dispatcher}:${HD_DEMO_DB_PASSWORD}@127.0.0.1:${HD_DEMO_DB_PORT:-5432}/dispatcher?sslmode=verify-full&sslrootcert=$CA"
# Named, not derived from the AMQP URL: a stack on other ports must not reach another's API.
export HD_AMQP_MANAGEMENT_URL="https://127.0.0.1:${HD_DEMO_MANAGEMENT_PORT:-15671}"

wait_healthy() {
    local service=$1 id status
    id=$("${COMPOSE[@]}" ps -q "$service")
    for i in $(seq 1 120); do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$id")
        if [ "$status" = healthy ]; then
            log "$service is healthy"
            return 0
        fi
        [ $((i % 10)) = 0 ] && log "waiting for $service ($status, ${i} s)"
        sleep 1
    done
    log "error: $service did not become healthy; its last output:"
    docker logs --tail 30 "$id" >&2
    return 1
}

# Identities: one broker user per process, made (or given a new secret) on every run with the
# administrator's credentials; only their passwords go to the containers.
password_of() {
    "$BIN/python" -c 'import sys, urllib.parse as u; print(u.unquote(u.urlsplit(sys.argv[1]).password))' "$1"
}

# RabbitMQ, PostgreSQL, the control plane, the failure monitor and the web process, each with a
# broker identity of its own; returns once the monitor is active.
start_stack() {
    docker network inspect hybrid-dispatcher-locations >/dev/null 2>&1 \
        || docker network create hybrid-dispatcher-locations >/dev/null
    "${COMPOSE[@]}" up -d rabbitmq postgres
    wait_healthy postgres
    wait_healthy rabbitmq
    local url i
    url=$("$BIN/dispatcher" identities add control-plane hd-control-plane)
    export HD_DEMO_CONTROL_PLANE_PASSWORD=$(password_of "$url")
    url=$("$BIN/dispatcher" identities add monitor hd-monitor)
    export HD_DEMO_MONITOR_PASSWORD=$(password_of "$url")
    url=$("$BIN/dispatcher" identities add web hd-web)
    export HD_DEMO_WEB_PASSWORD=$(password_of "$url")
    log "identities: hd-control-plane, hd-monitor, hd-web"
    "${COMPOSE[@]}" up -d control-plane relay monitor web
    for i in $(seq 1 120); do
        if "${COMPOSE[@]}" logs monitor 2>/dev/null | grep -q "this monitor is active"; then
            log "the failure monitor is active"
            return 0
        fi
        sleep 1
    done
    log "error: the failure monitor did not become active; its last output:"
    "${COMPOSE[@]}" logs --tail 30 monitor >&2
    return 1
}

# ---- what a demo that sources this file shares ends here.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

# `compose/demo.sh down` (`make demo-down`): the stack down, with the code servers and run
# containers its agent left on this engine (they are the agent's, not the compose project's).
if [ "${1:-}" = down ]; then
    log "taking the stack down (project $PROJECT)"
    "${COMPOSE[@]}" down --remove-orphans
    left=$(docker ps -aq --filter label=hybrid-dispatcher.agent-id=demo-agent)
    if [ -n "$left" ]; then
        log "removing $(echo "$left" | wc -l) container(s) the demo's agent left"
        docker rm -f $left >/dev/null
    fi
    exit 0
fi

log "starting RabbitMQ, PostgreSQL, the control plane, the failure monitor and one agent (project $PROJECT), TLS only"
start_stack
url=$("$BIN/dispatcher" agents add demo-agent --queue default)
export HD_DEMO_AGENT_PASSWORD=$(password_of "$url")
# The demo's runs are submitted with a submitter token limited to the queue `default`.
SUBMITTER_URL=$("$BIN/dispatcher" tokens add demo-submitter --queue default)
log "identities: agent demo-agent, token demo-submitter"
"${COMPOSE[@]}" up -d agent
"${COMPOSE[@]}" ps

failures=0
expect() {
    local want=$1 label=$2; shift 2
    log "submitting: $label"
    set +e
    HD_AMQP_URL=$SUBMITTER_URL "$BIN/dispatcher" submit --image "$RUN_IMAGE" --wait --timeout 120 -- "$@"
    local got=$?
    set -e
    if [ "$got" = "$want" ]; then
        log "as expected: exit code $got"
    else
        log "UNEXPECTED: exit code $got, wanted $want"
        failures=$((failures + 1))
    fi
}
expect 0 "a run that succeeds" sh -c 'echo hello from a container'
expect 3 "a run that exits 3" sh -c 'echo about to fail; exit 3'
expect 0 "a run that prints several lines" \
    sh -c 'for i in 1 2 3 4 5; do echo "step $i of 5"; sleep 0.2; done'
log "registering the example code location; the agent starts its code server"
"$BIN/dispatcher" locations add hello \
    --image "${HD_IMAGE_EXAMPLE_LOCATION:-hybrid-dispatcher/example-location:latest}" \
    2>/dev/null || "$BIN/dispatcher" locations redeploy hello
for i in $(seq 1 60); do
    "$BIN/dispatcher" locations list | grep -q "hello: LOADED" && break
    sleep 1
done
"$BIN/dispatcher" locations list
log "submitting: job count of location hello, which reports its steps"
set +e
HD_AMQP_URL=$SUBMITTER_URL "$BIN/dispatcher" submit --location hello --job count \
    --config '{"to": 3, "pause_s": 0.2}' --wait --timeout 120
got=$?
set -e
if [ "$got" = 0 ]; then log "as expected: exit code 0"; else
    log "UNEXPECTED: exit code $got"; failures=$((failures + 1)); fi
log "submitting a job with a bad config: the control plane refuses it"
if HD_AMQP_URL=$SUBMITTER_URL "$BIN/dispatcher" submit --location hello --job count \
    --config '{"to": "three"}'; then
    log "UNEXPECTED: accepted"; failures=$((failures + 1))
else
    log "as expected: rejected"
fi

log "the runs as the control plane recorded them:"
"$BIN/dispatcher" runs list --limit 4
latest=$("$BIN/dispatcher" runs list --limit 1 --json | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)[0]["run_id"])')
"$BIN/dispatcher" runs show "$latest"

# An operator's token for the web UI (a new one each time: it is shown only once).
"$BIN/dispatcher" api-tokens revoke demo-operator >/dev/null 2>&1 || true
operator_token=$("$BIN/dispatcher" api-tokens add demo-operator --scope operate)
log "web UI: http://127.0.0.1:${HD_DEMO_WEB_PORT:-8080}/ui (sign in with $operator_token);" \
    "API: http://127.0.0.1:${HD_DEMO_WEB_PORT:-8080}/api/v1 (Authorization: Bearer <token>)"
log "metrics: http://127.0.0.1:${HD_DEMO_SERVE_METRICS_PORT:-9464}/metrics (control plane)," \
    "http://127.0.0.1:${HD_DEMO_MONITOR_METRICS_PORT:-9465}/metrics (monitor)"
log "stop the stack with: make demo-down (or bash compose/demo.sh down)"
if [ "$failures" -gt 0 ]; then
    log "$failures run(s) did not end as expected"
    exit 1
fi
log "all four runs ended as expected"
