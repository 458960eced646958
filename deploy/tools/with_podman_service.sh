#!/usr/bin/env bash
# Run a command with podman's Docker-compatible API on a private socket (make container-test).
#
#   deploy/tools/with_podman_service.sh RUN_DIR COMMAND [ARGS...]
#
# Starts `podman system service` on RUN_DIR/podman.sock, exports DOCKER_HOST for it and
# TESTCONTAINERS_RYUK_DISABLED=true (the Ryuk reaper image cannot be pulled here), runs COMMAND,
# and on any exit stops exactly the service it started (by PID) and removes the containers left
# labelled with a data directory under RUN_DIR (a run killed before its clusters' stop()).
# CONTAINERS_CONF (the Makefile exports deploy/base/containers.conf) reaches the service.
set -euo pipefail

run_dir=$(realpath -m "${1:?usage: with_podman_service.sh RUN_DIR COMMAND [ARGS...]}")
shift
podman=${PODMAN:-podman}
command -v "$podman" >/dev/null || {
  echo "container-test needs podman (apt-get install -y podman runc), or run the tests against Docker:" >&2
  echo "  ARQONBUS_NATS_BACKEND=container pytest ... with DOCKER_HOST pointing at it" >&2
  exit 1
}
mkdir -p "$run_dir"
sock="$run_dir/podman.sock"
rm -f "$sock"

"$podman" system service --time=0 "unix://$sock" >"$run_dir/podman-service.log" 2>&1 &
service_pid=$!
echo "$service_pid" >"$run_dir/podman-service.pid"

stop_service() {
  local code=$?
  # Containers of clusters under RUN_DIR that a killed run could not remove (ours, by label).
  "$podman" ps -a --filter label=arqonbus.nats.base-dir \
    --format '{{.ID}} {{index .Labels "arqonbus.nats.base-dir"}}' 2>/dev/null |
    while read -r id base; do
      case "$base" in "$run_dir"/*) "$podman" rm -f "$id" >/dev/null 2>&1 || true ;; esac
    done
  if kill -0 "$service_pid" 2>/dev/null; then
    kill -TERM "$service_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$service_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$service_pid" 2>/dev/null || true
  fi
  wait "$service_pid" 2>/dev/null || true
  rm -f "$sock" "$run_dir/podman-service.pid"
  echo "==> stopped podman system service (pid $service_pid)"
  exit "$code"
}
trap stop_service EXIT
trap 'exit 130' INT TERM

# Wait (at most 10 s) for the API to answer; the service dies at once on a bad setup.
for _ in $(seq 100); do
  kill -0 "$service_pid" 2>/dev/null || { cat "$run_dir/podman-service.log" >&2; echo "podman system service exited" >&2; exit 1; }
  [ -S "$sock" ] && "$podman" --url "unix://$sock" version >/dev/null 2>&1 && break
  sleep 0.1
done
"$podman" --url "unix://$sock" version >/dev/null || { echo "podman system service did not answer on $sock within 10 s" >&2; exit 1; }
echo "==> podman system service (pid $service_pid) on unix://$sock"

export DOCKER_HOST="unix://$sock"
export TESTCONTAINERS_RYUK_DISABLED=true
"$@"
