#!/usr/bin/env bash
# A one-node Ray cluster on this machine (127.0.0.1), for trying `launcher: {kind: ray}` and for the tests.
#
#   tools/ray-local.sh up       start a Ray head on 127.0.0.1:$SPACH_RAY_PORT (default 6390) with the venv's
#                               `ray` (pip install 'spach[ray]'), unless one answers there   (= make ray-up)
#   tools/ray-local.sh down     stop the Ray processes of this machine (`ray stop`)           (= make ray-down)
#   tools/ray-local.sh status
#
# Usage statistics stay off (RAY_USAGE_STATS_ENABLED=0); the dashboard is not started.
set -euo pipefail
cd "$(dirname "$0")/.."

RAY=${RAY:-.venv/bin/ray}
PORT=${SPACH_RAY_PORT:-6390}
ADDRESS=127.0.0.1:$PORT
export RAY_USAGE_STATS_ENABLED=0

say() { echo "ray-local: $*"; }
[ -x "$RAY" ] || RAY=$(command -v ray || true)
[ -n "$RAY" ] || { echo "ray-local: error: no ray command; pip install 'spach[ray]' into the venv" >&2; exit 1; }

case "${1:-status}" in
    up)
        if "$RAY" status --address "$ADDRESS" >/dev/null 2>&1; then
            say "a Ray cluster already answers at $ADDRESS"
            exit 0
        fi
        "$RAY" start --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus "${SPACH_RAY_CPUS:-2}" \
            --include-dashboard false --disable-usage-stats >/dev/null
        say "up at $ADDRESS (launcher: {kind: ray, address: $ADDRESS})" ;;
    down)
        "$RAY" stop --force >/dev/null
        say "stopped" ;;
    status)
        "$RAY" status --address "$ADDRESS" ;;
    *)
        echo "usage: tools/ray-local.sh up|down|status" >&2
        exit 2 ;;
esac
