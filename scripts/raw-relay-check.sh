#!/usr/bin/env bash
# What ott-proxy's keep-alive HTTP path would cost off SwiftNIO's channels (docs/benchmarks.md, eighth session).
#
# Starts a 1 KiB nginx origin on two ports, then on loopback: raw-relay (Benchmarks/Sources/raw-relay: ott-proxy's own
# per-request code, Lua routing included, on two plain epoll threads), ott-proxy (release build) and HAProxy, each
# with two threads bound one per CPU and routing by the room in /rooms/{name}/... Then interleaves ROUNDS rounds of
# `wrk -t1 -c64 -d${DURATION}s` through each, printing requests/s, p99 and the proxy's CPU per request
# (utime + stime from /proc over the run, divided by the requests wrk completed). Stops everything it started.
#
#   ./scripts/raw-relay-check.sh            # ROUNDS=3 DURATION=5: about 1 minute after the build
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"

ensure_swift
need=("${BASE_PACKAGES[@]}" wrk haproxy curl)
command -v nginx >/dev/null || need+=(nginx-light)
ensure_packages "${need[@]}"
ulimit -n "$(ulimit -Hn)"

cd "$ROOT"
echo "==> building (release): ott-proxy, raw-relay"
"${RELEASE_BUILD[@]}" --product ott-proxy >/dev/null
"${RELEASE_BUILD[@]}" --package-path Benchmarks --product raw-relay >/dev/null

WORK="$(mktemp -d /tmp/raw-relay-check.XXXXXX)"
chmod 755 "$WORK"  # nginx workers run as another user
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# The origin and HAProxy configurations are bench-compare.sh's HTTP ones, on ports of their own (182xx), so both
# scripts can be run without stopping each other's processes.
mkdir -p "$WORK/www"
head -c 768 /dev/urandom | base64 -w0 | head -c 1024 > "$WORK/www/1k"
cat > "$WORK/origin.conf" <<EOF
worker_processes 1;
daemon off;
error_log $WORK/origin-error.log warn;
pid $WORK/origin.pid;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:18281 backlog=4096;
        listen 127.0.0.1:18282 backlog=4096;
        location / { root $WORK/www; try_files /1k =404; }
    }
}
EOF
cat > "$WORK/haproxy.cfg" <<EOF
global
    nbthread 2
    cpu-map auto:1/1-2 0-1
    maxconn 9000
defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse safe
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend http_in
    bind 127.0.0.1:18210
    default_backend http_origin
backend http_origin
    balance hash path,field(3,/)
    hash-type consistent
    server o1 127.0.0.1:18281
    server o2 127.0.0.1:18282
EOF
cat > "$WORK/ott-proxy.yaml" <<EOF
listeners:
  - name: http
    address: 127.0.0.1
    port: 18230
    pool: http
    routing:
      script: $ROOT/routing-scripts/path-key.lua
      options: { prefix: rooms, pool: http }
pools:
  http:
    backends:
      - { id: http-1, address: 127.0.0.1:18281 }
      - { id: http-2, address: 127.0.0.1:18282 }
logging:
  level: warning
  access_log: false
threads: { count: 2, cpu_affinity: auto }
EOF

nginx -p "$WORK" -c "$WORK/origin.conf" >/dev/null 2>&1 &
PIDS+=($!)
"$ROOT/Benchmarks/.build/release/raw-relay" --port 18240 --origin 127.0.0.1:18281 --origin 127.0.0.1:18282 \
    --threads 2 --pin --script "$ROOT/routing-scripts/path-key.lua" --option prefix=rooms --option pool=http \
    >"$WORK/raw-relay.log" 2>&1 &
RAW=$!
PIDS+=($RAW)
"$ROOT/.build/release/ott-proxy" run --config "$WORK/ott-proxy.yaml" >"$WORK/ott-proxy.log" 2>&1 &
OTT=$!
PIDS+=($OTT)
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
HAP=$!
PIDS+=($HAP)

for port in 18240 18230 18210; do
    for _ in $(seq 100); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/rooms/bench/1k" && break
        sleep 0.1
    done
    curl -sf -o /dev/null "http://127.0.0.1:$port/rooms/bench/1k" || { echo "error: nothing answers on $port" >&2; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
measure() { # name pid port
    local before after requests rps p99 errors
    before=$(cpu_ticks "$2")
    wrk -t1 -c64 -d"${DURATION}s" --latency "http://127.0.0.1:$3/rooms/bench/1k" >"$WORK/wrk.out"
    after=$(cpu_ticks "$2")
    requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
    p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk.out")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' "$WORK/wrk.out" | tr '\n' ' ')
    awk -v name="$1" -v a="$before" -v b="$after" -v n="$requests" -v r="$rps" -v p="$p99" -v e="$errors" -v hz="$(getconf CLK_TCK)" \
        'BEGIN {printf "  %-10s %9.0f req/s   p99 %8s   CPU/request %6.2f us  %s\n", name, r, p, (b - a) * 1e6 / hz / n, e}'
}

for round in $(seq "$ROUNDS"); do
    echo "==> round $round/$ROUNDS"
    measure raw-relay "$RAW" 18240
    measure ott-proxy "$OTT" 18230
    measure haproxy "$HAP" 18210
done
