#!/usr/bin/env bash
# First forwarding throughput figure: wrk against an nginx origin serving 1 KiB, directly and through ott-proxy
# (release build), HTTP/1.1 keep-alive. Bounded: two runs of DURATION each. Prints a markdown table.
#   usage: scripts/bench-forwarding.sh [DURATION=10s] [CONNECTIONS=64]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DURATION="${1:-10s}"
CONNECTIONS="${2:-64}"
ensure_swift
ensure_packages "${BASE_PACKAGES[@]}" wrk nginx-light
cd "$ROOT"
"${RELEASE_BUILD[@]}" --product ott-proxy >/dev/null

WORK="$(mktemp -d)"
ORIGIN_PORT=18081
PROXY_PORT=18080
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

head -c 1024 /dev/zero | tr '\0' 'x' > "$WORK/index.html"
mkdir -p "$WORK/logs"
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
error_log $WORK/logs/error.log warn;
pid $WORK/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$ORIGIN_PORT;
        location / { root $WORK; index index.html; }
    }
}
CONF
nginx -p "$WORK" -c "$WORK/nginx.conf" &
pids+=($!)

cat > "$WORK/proxy.yaml" <<CONF
listeners:
  - name: bench
    address: 127.0.0.1
    port: $PROXY_PORT
    pool: origin
pools:
  origin:
    backends:
      - id: nginx
        address: 127.0.0.1:$ORIGIN_PORT
logging:
  level: warning
  access_log: false
CONF
"$ROOT/.build/release/ott-proxy" run --config "$WORK/proxy.yaml" &
pids+=($!)

for port in $ORIGIN_PORT $PROXY_PORT; do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
done

run() { # name url
    local out; out="$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$2")"
    local rps p50 p99
    rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
    p50="$(awk '$1=="50%" {print $2}' <<<"$out")"
    p99="$(awk '$1=="99%" {print $2}' <<<"$out")"
    printf '| %s | %s | %s | %s |\n' "$1" "$rps" "$p50" "$p99"
}
echo "| target | requests/s | p50 | p99 |"
echo "|---|---|---|---|"
run "nginx origin (direct)" "http://127.0.0.1:$ORIGIN_PORT/"
run "ott-proxy → nginx" "http://127.0.0.1:$PROXY_PORT/"
