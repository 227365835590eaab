#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine: one head plus N worker nodes, each a
# separate `ray start` with its own ports, CPUs, object store and custom resources.
# It is the cluster path (Jobs API, several raylets, actors spread over nodes) without
# a cloud account. Only the processes this script started are ever stopped, so it is
# safe beside other Ray instances on the same machine.
#
#   cluster/local.sh up [N]     start a head and N workers (default 2); idempotent
#   cluster/local.sh status     nodes, resources and addresses
#   cluster/local.sh down       stop this cluster's nodes only; idempotent
#
# Settings (environment):
#   FS_CLUSTER_PORT=26380          base port; everything else is derived from it, so two
#                                  clusters with different bases never collide
#   FS_CLUSTER_DIR=/tmp/fsray-$FS_CLUSTER_PORT   state, logs and Ray temp dirs
#   FS_CLUSTER_CPUS=1              CPUs per worker node
#   FS_CLUSTER_HEAD_CPUS=0         CPUs on the head (0: the head only runs drivers)
#   FS_CLUSTER_GPUS=0              GPUs per worker node
#   FS_CLUSTER_OBJECT_STORE=200000000   object store bytes per node
#   FS_CLUSTER_HOST=127.0.0.1      address the nodes bind to
#   FS_CLUSTER_AUTH_MODE=disabled  Ray's RAY_AUTH_MODE for the nodes. Ray >= 2.5x turns token auth on
#                                  by default; this loopback-only test cluster turns it off so that
#                                  `featurestore submit` needs no token. Set "token" to keep it (then
#                                  clients need RAY_AUTH_MODE=token and the token, see Ray's docs).
#   RAY=ray                        the ray executable (its directory goes first on the nodes' PATH,
#                                  so jobs run `python` from the same environment)
set -euo pipefail

BASE=${FS_CLUSTER_PORT:-26380}
DIR=${FS_CLUSTER_DIR:-/tmp/fsray-$BASE}
CPUS=${FS_CLUSTER_CPUS:-1}
HEAD_CPUS=${FS_CLUSTER_HEAD_CPUS:-0}
GPUS=${FS_CLUSTER_GPUS:-0}
OBJECT_STORE=${FS_CLUSTER_OBJECT_STORE:-200000000}
HOST=${FS_CLUSTER_HOST:-127.0.0.1}
RAY=${RAY:-$(command -v ray || true)}
MAX_WORKERS=8
export RAY_AUTH_MODE=${FS_CLUSTER_AUTH_MODE:-disabled}

GCS_PORT=$BASE
DASHBOARD_PORT=$((BASE + 1))
CLIENT_PORT=$((BASE + 2))

die() { echo "local.sh: $*" >&2; exit 1; }

node_ports() {  # node index (0 = head) -> the ray start flags for its own ports
  local i=$1 p=$((BASE + 10 + 10 * $1)) w=$((BASE + 200 + 100 * $1))
  echo "--node-manager-port $p --object-manager-port $((p + 1)) \
--dashboard-agent-listen-port $((p + 2)) --dashboard-agent-grpc-port $((p + 3)) \
--metrics-export-port $((p + 4)) --runtime-env-agent-port $((p + 5)) \
--min-worker-port $w --max-worker-port $((w + 99))"
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# PIDs of every process that belongs to this cluster: the recorded `ray start --block`
# processes and anything whose command line names this cluster's directory (raylets,
# GCS, dashboard, workers all carry their temp/session dir in their arguments).
our_pids() {
  local pid f
  for f in "$DIR"/pids/*.pid; do
    [[ -e "$f" ]] || continue
    pid=$(cat "$f")
    alive "$pid" && echo "$pid"
  done
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/}; pid=${pid%/cmdline}
    [[ "$pid" == "$$" ]] && continue
    if { tr '\0' ' ' <"$f"; } 2>/dev/null | grep -qF -- "$DIR/"; then echo "$pid"; fi
  done | sort -u
  return 0
}

wait_for_log() {  # file pattern seconds pid
  local file=$1 pattern=$2 secs=$3 pid=$4 t=0
  while ((t < secs * 2)); do
    grep -q "$pattern" "$file" 2>/dev/null && return 0
    alive "$pid" || { tail -n 30 "$file" >&2; die "node exited during start (log: $file)"; }
    sleep 0.5; t=$((t + 1))
  done
  tail -n 30 "$file" >&2
  die "node did not start within ${secs}s (log: $file)"
}

start_node() {  # index, extra flags...
  local i=$1; shift
  local tmp="$DIR/n$i" log="$DIR/logs/node-$i.log"
  mkdir -p "$tmp" "$DIR/logs" "$DIR/pids"
  # --block keeps `ray start` in the foreground as the parent of its node: stopping it
  # (SIGTERM) shuts down exactly this node. setsid detaches it from our terminal.
  # shellcheck disable=SC2046
  setsid "$RAY" start --block --disable-usage-stats --node-ip-address "$HOST" \
    --temp-dir "$tmp" --object-store-memory "$OBJECT_STORE" $(node_ports "$i") "$@" \
    >"$log" 2>&1 </dev/null &
  echo $! >"$DIR/pids/node-$i.pid"
  wait_for_log "$log" "Ray runtime started" 90 "$(cat "$DIR/pids/node-$i.pid")"
}

running_head() { [[ -f "$DIR/pids/node-0.pid" ]] && alive "$(cat "$DIR/pids/node-0.pid")"; }

print_addresses() {
  echo "Dashboard:    http://$HOST:$DASHBOARD_PORT"
  echo "Jobs API:     http://$HOST:$DASHBOARD_PORT   (featurestore submit SPEC --address http://$HOST:$DASHBOARD_PORT)"
  echo "GCS address:  $HOST:$GCS_PORT   (ray.init(address=\"$HOST:$GCS_PORT\"))"
  echo "Ray client:   ray://$HOST:$CLIENT_PORT"
}

show_nodes() {
  local py; py="$(dirname "$RAY")/python"; [[ -x "$py" ]] || py=python3
  "$py" - "$HOST:$DASHBOARD_PORT" <<'EOF' || echo "(node list unavailable: is the dashboard up?)"
import sys
from ray.util.state import list_nodes
nodes = list_nodes(address="http://" + sys.argv[1], raise_on_missing_output=False)
for n in sorted(nodes, key=lambda n: (not n.is_head_node, n.resources_total.get("fs_worker_index", 0))):
    res = ", ".join(f"{k}={v:g}" for k, v in sorted(n.resources_total.items())
                    if not k.startswith("node:") and "memory" not in k)
    print(f"  {'head  ' if n.is_head_node else 'worker'} {n.node_id[:12]} {n.state:<6} {res}")
EOF
}

wait_for_nodes() {  # expected count
  local want=$1 py t=0; py="$(dirname "$RAY")/python"; [[ -x "$py" ]] || py=python3
  while ((t < 120)); do
    if "$py" - "$HOST:$DASHBOARD_PORT" "$want" <<'EOF' 2>/dev/null; then return 0; fi
import sys
from ray.util.state import list_nodes
alive = [n for n in list_nodes(address="http://" + sys.argv[1], raise_on_missing_output=False) if n.state == "ALIVE"]
sys.exit(0 if len(alive) >= int(sys.argv[2]) else 1)
EOF
    sleep 1; t=$((t + 1))
  done
  die "only some of the $want nodes registered within 120s; see $DIR/logs"
}

cmd_up() {
  local n=${1:-2}
  [[ "$n" =~ ^[0-9]+$ ]] && ((n >= 1 && n <= MAX_WORKERS)) || die "up N: N must be 1..$MAX_WORKERS worker nodes, got '$n'"
  [[ -x "$RAY" ]] || die "no 'ray' executable found; install the package (pip install \".[s3]\") or set RAY=/path/to/ray"
  export PATH="$(dirname "$RAY"):$PATH"
  if running_head; then
    local have; have=$(ls "$DIR"/pids/node-*.pid 2>/dev/null | wc -l)
    echo "cluster already up in $DIR with $((have - 1)) worker node(s); 'down' first to resize"
    print_addresses
    return 0
  fi
  [[ -n "$(our_pids)" ]] && cmd_down >/dev/null
  rm -rf "$DIR"; mkdir -p "$DIR"
  echo "starting head (GCS $HOST:$GCS_PORT, $HEAD_CPUS CPU) ..."
  start_node 0 --head --port "$GCS_PORT" --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
    --ray-client-server-port "$CLIENT_PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0 \
    --resources '{"fs_head": 1}'
  local i
  for ((i = 1; i <= n; i++)); do
    echo "starting worker $i ($CPUS CPU, $GPUS GPU) ..."
    start_node "$i" --address "$HOST:$GCS_PORT" --num-cpus "$CPUS" --num-gpus "$GPUS" \
      --resources "{\"fs_worker\": 1, \"fs_worker_$i\": 1, \"fs_worker_index\": $i}"
  done
  wait_for_nodes $((n + 1))
  echo "cluster up: head + $n worker node(s); state and logs in $DIR"
  print_addresses
}

cmd_down() {
  local pids pid t
  pids=$(our_pids)
  if [[ -z "$pids" ]]; then
    echo "no cluster running from $DIR"
    return 0
  fi
  # Workers first, then the head: each `ray start --block` stops its own node on SIGTERM.
  for f in $(ls -r "$DIR"/pids/node-*.pid 2>/dev/null); do
    pid=$(cat "$f"); alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
  done
  for ((t = 0; t < 40; t++)); do
    [[ -z "$(our_pids)" ]] && break
    sleep 0.5
  done
  pids=$(our_pids)
  if [[ -n "$pids" ]]; then  # stragglers of this cluster only (matched by its directory)
    kill -TERM $pids 2>/dev/null || true
    sleep 2
    pids=$(our_pids)
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
  fi
  rm -f "$DIR"/pids/*.pid
  echo "cluster in $DIR stopped"
}

cmd_status() {
  if ! running_head; then
    echo "no cluster running from $DIR"
    return 3
  fi
  echo "cluster running from $DIR"
  print_addresses
  show_nodes
}

case "${1:-}" in
  up) cmd_up "${2:-2}" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up [N] | status | down" >&2; exit 2 ;;
esac
