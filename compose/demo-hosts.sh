#!/usr/bin/env bash
# The demo on several agent hosts: the same stack as compose/demo.sh (without its agent), then
# N hosts with Docker engines of their own (compose/hosts.py), an agent on each host talking to
# the stack's broker over TLS and to its host's engine, runs submitted to the one shared queue,
# which host ran each, and a check that every run succeeded exactly once. Removes the agents and
# hosts and takes the stack down when it ends, whatever the outcome; exits non-zero when a check
# fails.
#
#     bash compose/demo-hosts.sh [N]        # N hosts, 2 by default; HD_DEMO_RUNS runs (4 a host)
#
# Its stack is a compose project of its own on ports of its own, so that it runs next to the
# stack `make demo` leaves running without touching it.
set -euo pipefail
HOSTS=${1:-2}
if ! [[ "$HOSTS" =~ ^[1-9][0-9]?$ ]]; then
    echo "usage: $0 [N]   (N agent hosts, 1 to 99; default 2)" >&2
    exit 2
fi
RUNS=${HD_DEMO_RUNS:-$((4 * HOSTS))}
if ! [[ "$RUNS" =~ ^[1-9][0-9]{0,2}$ ]] || [ "$RUNS" -lt "$HOSTS" ]; then
    echo "HD_DEMO_RUNS=$RUNS: give 1 to 999 runs, at least one a host ($HOSTS)" >&2
    exit 2
fi
export HD_DEMO_PROJECT=${HD_DEMO_PROJECT:-hybrid-dispatcher-demo-hosts}
export HD_DEMO_AMQP_PORT=${HD_DEMO_AMQP_PORT:-25671}
export HD_DEMO_MANAGEMENT_PORT=${HD_DEMO_MANAGEMENT_PORT:-25672}
export HD_DEMO_DB_PORT=${HD_DEMO_DB_PORT:-25432}
export HD_DEMO_WEB_PORT=${HD_DEMO_WEB_PORT:-28080}
export HD_DEMO_SERVE_METRICS_PORT=${HD_DEMO_SERVE_METRICS_PORT:-29464}
export HD_DEMO_MONITOR_METRICS_PORT=${HD_DEMO_MONITOR_METRICS_PORT:-29465}
# Credentials, certificates, URLs, COMPOSE, start_stack, password_of (and the repository as
# the working directory).
source "$(dirname "$0")/demo.sh"
log() { echo "[demo-hosts] $*"; }

PREFIX=hd-demo-host
AGENT_IMAGE=${HD_IMAGE_AGENT:-hybrid-dispatcher/agent:latest}
# Every agent container carries it, so that the cleanup finds them all.
AGENT_LABEL=hybrid-dispatcher.demo-hosts=$PROJECT
WORK=$(mktemp -d)
declare -A ENGINE # host name -> its engine's URL
STEP=0
step() {
    STEP=$((STEP + 1))
    log "step $STEP (at ${SECONDS} s): $*"
}
fail() {
    log "FAILED: $*" >&2
    exit 1
}

cleanup() {
    local status=$? name
    set +e
    trap - EXIT INT TERM
    if [ "$status" != 0 ]; then
        for name in "${!ENGINE[@]}"; do
            docker inspect "$name-agent" >/dev/null 2>&1 || continue
            log "the last output of the agent on $name:" >&2
            docker logs --tail 20 "$name-agent" 2>&1 | sed 's/^/    /' >&2
        done
    fi
    log "cleaning up: removing the agents and the agent hosts, taking the stack down"
    docker ps -aq --filter "label=$AGENT_LABEL" | xargs -r docker rm -f >/dev/null
    "$BIN/python" compose/hosts.py down --prefix "$PREFIX" 2>&1 | sed 's/^/    /'
    "${COMPOSE[@]}" down --remove-orphans >/dev/null 2>&1 \
        || log "could not take the stack down: run ${COMPOSE[*]} down" >&2
    rm -rf "$WORK"
    if [ "$status" = 0 ]; then
        log "done: $RUNS runs on $HOSTS hosts, each succeeded exactly once"
    else
        log "the demo failed (exit code $status); see the messages above" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "starting RabbitMQ, PostgreSQL, the control plane and the failure monitor" \
    "(project $PROJECT, broker on 127.0.0.1:$HD_DEMO_AMQP_PORT), TLS only"
start_stack
SUBMITTER_URL=$("$BIN/dispatcher" tokens add demo-hosts-submitter --queue default)
NETWORK=$(docker network ls --format '{{.Name}}' \
    --filter "label=com.docker.compose.project=$PROJECT" \
    --filter label=com.docker.compose.network=default)
[ -n "$NETWORK" ] || fail "the stack's network (project $PROJECT) is missing"

step "starting $HOSTS agent hosts (Docker engines of their own) on the stack's network $NETWORK"
"$BIN/python" compose/hosts.py up "$HOSTS" --prefix "$PREFIX" --network "$NETWORK" \
    --load "$RUN_IMAGE" >"$WORK/hosts" \
    || fail "the agent hosts did not start (compose/hosts.py said why above)"
while IFS=$'\t' read -r name url _; do
    ENGINE[$name]=$url
    log "host $name: engine $url, holding $RUN_IMAGE"
done <"$WORK/hosts"
[ "${#ENGINE[@]}" = "$HOSTS" ] || fail "$HOSTS hosts asked for, ${#ENGINE[@]} started"

# An agent on a host: the agent image as the compose stack runs it, in the host's network
# namespace (its name, its address on the stack's network, from which `rabbitmq` resolves) and
# with the host's engine as its Docker engine (DOCKER_HOST: the directory of its socket, which
# outlives a restart of that engine). Its runs get no network: the host's engine has no bridge.
step "starting an agent on each host: agent id = host name, queue default, 2 runs at a time"
for name in $(printf '%s\n' "${!ENGINE[@]}" | sort); do
    url=$("$BIN/dispatcher" agents add "$name" --queue default)
    docker run -d --name "$name-agent" --label "$AGENT_LABEL" --network "container:$name" \
        --group-add "$HD_DOCKER_GID" --restart unless-stopped \
        -v "$(dirname "${ENGINE[$name]#unix://}"):/run/hd-host" -v "$CA:/run/hd-tls/ca.pem:ro" \
        -e DOCKER_HOST=unix:///run/hd-host/docker.sock -e HD_AGENT_ID="$name" \
        -e HD_AMQP_URL="amqps://$name:$(password_of "$url")@rabbitmq:5671/?cafile=/run/hd-tls/ca.pem" \
        "$AGENT_IMAGE" worker-agent run --queue default --max-concurrent 2 \
        --run-network none --trust-control-plane hd-control-plane >/dev/null \
        || fail "the agent on $name did not start (Docker said why above)"
    log "agent $name started on host $name"
done

step "waiting until the control plane hears every agent (ALIVE)"
alive=0
for i in $(seq 1 90); do
    alive=$("$BIN/dispatcher" agents list --json | "$BIN/python" -c '
import json, sys
print(sum(1 for a in json.load(sys.stdin) if a["agent_id"].startswith(sys.argv[1] + "-")
          and a["status"] == "ALIVE" and "default" in a["queues"]))' "$PREFIX")
    [ "$alive" = "$HOSTS" ] && break
    [ $((i % 10)) = 0 ] && log "$alive of $HOSTS agents alive after ${i} s"
    sleep 1
done
[ "$alive" = "$HOSTS" ] || fail "only $alive of $HOSTS agents became ALIVE within 90 s"
"$BIN/dispatcher" agents list | sed 's/^/    /'

step "submitting $RUNS runs to the queue default at once (each prints a line and sleeps 2 s)"
since=$(date +%s)
pids=()
for n in $(seq 1 "$RUNS"); do
    HD_AMQP_URL=$SUBMITTER_URL "$BIN/dispatcher" submit --image "$RUN_IMAGE" -- \
        sh -c "echo run $n of $RUNS; sleep 2" >"$WORK/submitted-$n" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || fail "a submission was refused (see above)"; done
for n in $(seq 1 "$RUNS"); do echo "$n $(cat "$WORK/submitted-$n")"; done >"$WORK/run-ids"
log "submitted: $RUNS runs"

step "waiting for every run to end"
ended=0
for i in $(seq 1 180); do
    "$BIN/dispatcher" runs list --limit 500 --json >"$WORK/runs.json"
    ended=$("$BIN/python" -c '
import json, sys
ids = {line.split()[1] for line in open(sys.argv[1])}
ends = {"SUCCESS", "FAILURE", "CANCELED"}
print(sum(1 for r in json.load(open(sys.argv[2])) if r["run_id"] in ids and r["state"] in ends))
' "$WORK/run-ids" "$WORK/runs.json")
    [ "$ended" = "$RUNS" ] && break
    [ $((i % 10)) = 0 ] && log "$ended of $RUNS runs ended after ${i} s"
    sleep 1
done
[ "$ended" = "$RUNS" ] || fail "only $ended of $RUNS runs ended within 180 s"
log "all $RUNS runs ended"

step "which host ran each run: the control plane's record, checked against Docker's events" \
    "on every host's engine"
until=$(date +%s)
for name in "${!ENGINE[@]}"; do
    docker -H "${ENGINE[$name]}" events --since "$since" --until "$until" \
        --filter type=container --filter event=start --filter event=die \
        --filter label=hybrid-dispatcher.run-id --format '{{json .}}' >"$WORK/events-$name"
done
"$BIN/python" - "$WORK" <<'EOF' || fail "not every run succeeded exactly once (above)"
"""Each run: SUCCESS, first attempt, exit 0, on a demo host, started once across all engines."""
import collections, json, pathlib, sys

work = pathlib.Path(sys.argv[1])
ids = dict(line.split()[::-1] for line in (work / "run-ids").read_text().splitlines())
runs = {r["run_id"]: r for r in json.loads((work / "runs.json").read_text())}
starts, exits = collections.defaultdict(list), {}
for events in sorted(work.glob("events-*")):
    host = events.name.removeprefix("events-")
    for line in events.read_text().splitlines():
        event = json.loads(line)
        attributes = event["Actor"]["Attributes"]
        run_id = attributes["hybrid-dispatcher.run-id"]
        if event["Action"] == "start":
            starts[run_id].append(host)
        else:
            exits[(run_id, host)] = attributes.get("exitCode")
problems = []
print(f"    {'#':>2}  {'RUN':36}  {'STATE':8}  {'ATTEMPT':>7}  {'EXIT':>4}  {'AGENT (HOST)':18}  STARTED ON")
for run_id, number in ids.items():
    run = runs[run_id]
    agent, started = run["agent_id"] or "-", starts.get(run_id, [])
    exit_code = "-" if run["exit_code"] is None else run["exit_code"]
    print(
        f"    {number:>2}  {run_id:36}  {run['state']:8}  {run['attempt']:>7}  {exit_code:>4}  "
        f"{agent:18}  {', '.join(started) or 'nowhere'}"
    )
    if (run["state"], run["attempt"], run["exit_code"]) != ("SUCCESS", 1, 0):
        problems.append(f"run {run_id}: {run['state']}, attempt {run['attempt']}, exit "
                        f"{exit_code} ({run['failure_reason'] or 'no reason'})")
    if started != [agent]:
        problems.append(f"run {run_id}: recorded on {agent}, containers started on "
                        f"{started or 'no engine'}")
    elif exits.get((run_id, agent)) != "0":
        problems.append(f"run {run_id}: its container on {agent} exited "
                        f"{exits.get((run_id, agent), 'never')}")
hosts = sorted(events.name.removeprefix("events-") for events in work.glob("events-*"))
count = collections.Counter(runs[run_id]["agent_id"] for run_id in ids)
print("    per host: " + ", ".join(f"{host} ran {count[host]}" for host in hosts))
idle = [host for host in hosts if not count[host]]
if idle:
    problems.append(f"no run went to {', '.join(idle)}: the queue was not shared")
for problem in problems:
    print(f"[demo-hosts] FAILED: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
