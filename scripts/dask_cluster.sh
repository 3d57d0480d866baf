#!/usr/bin/env bash
# Starts or stops a local Dask cluster to run imgembed's Beam jobs on, with the
# versions pinned in constraints.txt (installed into .venv by scripts/ensure_venv.sh):
# one `dask scheduler` and N `dask worker` processes of one thread each.
#
#   scripts/dask_cluster.sh start [WORKERS] [PORT]   # default 2 workers, port 8786
#   .venv/bin/imgembed embed ... --runner DaskRunner --dask_client_address tcp://127.0.0.1:8786
#   scripts/dask_cluster.sh stop
#
# Their logs and process ids are kept in .dask-cluster/. On several machines, run
# `dask scheduler` on one and `dask worker tcp://SCHEDULER:8786` on each other, from
# the same installation of imgembed, and share the data through object storage.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_venv.sh
state=".dask-cluster"

case "${1:-}" in
  start)
    workers="${2:-2}" port="${3:-8786}"
    mkdir -p "$state"
    [ -f "$state/pids" ] && { echo "a cluster is running already (scripts/dask_cluster.sh stop)" >&2; exit 1; }
    "$VENV/bin/dask" scheduler --host 127.0.0.1 --port "$port" --dashboard-address :0 \
      > "$state/scheduler.log" 2>&1 &
    echo $! >> "$state/pids"
    # Dask's statistical profiler samples every thread's stack 100 times a second with
    # sys._current_frames(), which on CPython 3.11 can deadlock a worker
    # (gh-106883): the scheduler restarts it only after worker-ttl (5 minutes).
    export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False
    for ((i = 0; i < workers; i++)); do
      "$VENV/bin/dask" worker "tcp://127.0.0.1:$port" --nthreads 1 --name "worker-$i" \
        --dashboard-address :0 > "$state/worker-$i.log" 2>&1 &
      echo $! >> "$state/pids"
    done
    "$VENV/bin/python" - "$port" "$workers" <<'PY'
import sys, time
from distributed import Client
port, workers = sys.argv[1], int(sys.argv[2])
with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
    client.wait_for_workers(workers, timeout=120)
print(f"Dask cluster: tcp://127.0.0.1:{port}, {workers} workers "
      f"(--runner DaskRunner --dask_client_address tcp://127.0.0.1:{port})")
PY
    ;;
  stop)
    [ -f "$state/pids" ] || { echo "no cluster started here" >&2; exit 1; }
    pids="$(cat "$state/pids")"
    kill $pids 2>/dev/null || true
    for _ in $(seq 60); do  # workers finish their task, then stop (a nanny kills one after 8 s)
      kill -0 $pids 2>/dev/null || break
      sleep 0.5
    done
    rm -f "$state/pids"
    echo "Dask cluster stopped"
    ;;
  *)
    echo "usage: scripts/dask_cluster.sh start [WORKERS] [PORT] | stop" >&2
    exit 2
    ;;
esac
