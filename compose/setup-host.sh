#!/usr/bin/env bash
# Make sure a Docker engine answers, and that the host tools the image build and the browser
# tests need exist.
#
# When no engine answers and this is Debian and we are root, install docker.io (and
# debootstrap, docker-compose), start dockerd in the background and wait until it answers.
# Anywhere else, stop with a message that says what is missing and how to get it.
set -euo pipefail

log() { echo "[setup] $*"; }
engine_answers() { docker info >/dev/null 2>&1; }
is_debian_root() { [ "$(id -u)" = 0 ] && [ -r /etc/debian_version ]; }

missing=()
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
# The web UI's browser tests drive Debian's Chromium (no browser download).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# shellcheck disable=SC2207
missing=($(printf '%s\n' "${missing[@]}" | sort -u))

if [ "${#missing[@]}" -gt 0 ]; then
    if is_debian_root; then
        log "installing ${missing[*]} from Debian's packages"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q "${missing[@]}" >/dev/null
    elif ! engine_answers; then
        echo "error: missing ${missing[*]}. Install them (on Debian: sudo apt-get install" \
             "${missing[*]}), or run this script as root on Debian to do it for you." >&2
        exit 1
    fi
fi

if engine_answers; then
    log "Docker engine answers: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
    exit 0
fi

if ! is_debian_root; then
    echo "error: no Docker engine answers at ${DOCKER_HOST:-unix:///var/run/docker.sock}." \
         "Start one (e.g. 'sudo systemctl start docker'), or run this script as root on Debian" \
         "to start dockerd in the background." >&2
    exit 1
fi

log_file=/var/log/hybrid-dispatcher-dockerd.log
log "no Docker engine answers; starting dockerd in the background (log: $log_file)"
# setsid: the daemon outlives this script and the make that called it.
setsid dockerd >"$log_file" 2>&1 < /dev/null &
for _ in $(seq 1 60); do
    if engine_answers; then
        log "Docker engine answers: $(docker version --format '{{.Server.Version}}')"
        exit 0
    fi
    sleep 1
done
echo "error: dockerd did not answer within 60 s; its log ($log_file) ends with:" >&2
tail -n 20 "$log_file" >&2
exit 1
