#!/usr/bin/env bash
# The demo: bring up the stack with docker-compose and show that every service answers.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
PROJECT=${HD_DEMO_PROJECT:-hybrid-dispatcher-demo}
COMPOSE=(docker-compose -f compose/docker-compose.yml -p "$PROJECT")
log() { echo "[demo] $*"; }

log "starting RabbitMQ and PostgreSQL (docker-compose project $PROJECT)"
"${COMPOSE[@]}" up -d rabbitmq postgres

wait_healthy() {
    local service=$1 id status
    id=$("${COMPOSE[@]}" ps -q "$service")
    for i in $(seq 1 120); do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$id")
        if [ "$status" = healthy ]; then
            log "$service is healthy after ${i} s"
            return 0
        fi
        [ $((i % 10)) = 0 ] && log "waiting for $service ($status, ${i} s)"
        sleep 1
    done
    log "error: $service did not become healthy; its last output:"
    docker logs --tail 30 "$id" >&2
    return 1
}
wait_healthy postgres
wait_healthy rabbitmq

"${COMPOSE[@]}" ps
AMQP_URL="amqp://${HD_DEMO_AMQP_USER:-dispatcher}:${HD_DEMO_AMQP_PASSWORD:-dispatcher}@127.0.0.1:${HD_DEMO_AMQP_PORT:-5672}/"
log "checking this host as an agent would see it"
"$BIN/worker-agent" check --amqp-url "$AMQP_URL"
log "the stack is up; stop it with: ${COMPOSE[*]} down"
