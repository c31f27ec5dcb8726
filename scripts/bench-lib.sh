#!/usr/bin/env bash
# Configurations shared by the load scripts (bench-compare.sh, http-interleave.sh), so that every comparison runs the
# same origin, the same HAProxy and the same ott-proxy setup. Each function prints a configuration file.

# bench_origin_conf DIR WWW PORT_A PORT_B FD_LIMIT: the shared HTTP origin, nginx serving WWW/1k on two ports.
bench_origin_conf() {
    cat <<CONF
# the shared HTTP origin: 1 KiB for every path, on two ports (two pool entries)
worker_processes 1;
daemon off;
error_log $1/logs/error.log warn;
pid $1/nginx.pid;
worker_rlimit_nofile $5;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$3 backlog=4096;
        listen 127.0.0.1:$4 backlog=4096;
        location / { root $2; try_files /1k =404; }
    }
}
CONF
}

# bench_cpu_map: HAProxy's cpu-map line binding its two threads one per CPU, to the first two CPUs this script may run
# on. It must be the `auto:` form: HAProxy 2.6.12 (Debian 12) accepts `cpu-map 1/1 0` + `cpu-map 1/2 1` without a word
# and leaves both threads on every CPU (checked with taskset; the "bound" runs of sessions 5-12 in docs/benchmarks.md
# compared against an unbound HAProxy because of it). bench_affinity below checks what each process really got.
bench_cpu_map() {
    python3 -c 'import os; c = sorted(os.sched_getaffinity(0)); print(f"cpu-map auto:1/1-2 {c[0]} {c[1]}" if len(c) > 1 else "")'
}

# bench_round_order ROUND COUNT: the indexes 0..COUNT-1 in the order round ROUND (from 1) measures its targets: it
# starts one target further each round and runs backwards every other round, so no target is always measured in the
# same position, nor always right after the same one.
bench_round_order() {
    local round=$1 count=$2 i
    for i in $(seq 0 $((count - 1))); do
        if [ $((round % 2)) = 1 ]; then echo $(((round - 1 + i) % count)); else echo $((((round - 1 - i) % count + count) % count)); fi
    done
}

# bench_affinity NAME PID... : one line, NAME then TID:CPUS for each thread of the PIDs that does the work (the CPUs it
# may run on), e.g. "haproxy 1201:0 1207:1". For ott-proxy only the threads that carry traffic count (its event loops
# and relays).
bench_affinity() {
    local name=$1 out="" pid tid comm
    shift
    for pid in "$@"; do
        for tid in $(ls "/proc/$pid/task"); do
            comm="$(cat "/proc/$pid/task/$tid/comm" 2>/dev/null)" || continue
            if [ "$name" = ott-proxy ]; then case "$comm" in NIO-ELT-* | ott-http-* | ott-tunnel-*) ;; *) continue ;; esac; fi
            out+=" $tid:$(taskset -pc "$tid" | sed 's/.*: //')"
        done
    done
    echo "$name$out"
}

# bench_affinity_check MODE LINE: with MODE auto, every thread in LINE (bench_affinity's output) must be bound to one
# CPU; with none, none may be. Exits with an error naming the process otherwise.
bench_affinity_check() {
    local mode=$1 line=$2 item cpus
    for item in ${line#* }; do
        cpus="${item#*:}"
        if [ "$mode" = auto ] && [[ "$cpus" == *[,-]* ]]; then
            echo "error: AFFINITY=auto but ${line%% *} thread ${item%%:*} may run on CPUs $cpus" >&2; exit 1
        fi
        if [ "$mode" = none ] && [[ "$cpus" != *[,-]* ]] && [ "$(nproc)" -gt 1 ]; then
            echo "error: AFFINITY=none but ${line%% *} thread ${item%%:*} is bound to CPU $cpus" >&2; exit 1
        fi
    done
}

# bench_haproxy_conf CPU_MAP MAXCONN HTTP_PORT ORIGIN_A ORIGIN_B [WS_PORT WS_A WS_B]: key = 3rd field of the path,
# consistent hashing over two origin entries; with the WebSocket ports, a second frontend and backend for them.
bench_haproxy_conf() {
    local ws_frontend="" ws_backend=""
    if [ $# -ge 8 ]; then
        ws_frontend="
frontend ws_in
    bind 127.0.0.1:$6
    default_backend ws_origin"
        ws_backend="
backend ws_origin
    balance hash path,field(3,/)
    hash-type consistent
    server w1 127.0.0.1:$7
    server w2 127.0.0.1:$8"
    fi
    cat <<CONF
# HAProxy: key = 3rd field of the path (/rooms/{key}/...), consistent hashing over two origin entries.
# WebSocket upgrades pass through in mode http (timeout tunnel applies once upgraded).
global
    nbthread 2
    $1
    maxconn $2
defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse safe
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout tunnel 1h
frontend http_in
    bind 127.0.0.1:$3
    default_backend http_origin$ws_frontend
backend http_origin
    balance hash path,field(3,/)
    hash-type consistent
    server o1 127.0.0.1:$4
    server o2 127.0.0.1:$5$ws_backend
CONF
}

# bench_ott_conf THREADS MAX_CONNECTIONS HTTP_PORT ORIGIN_A ORIGIN_B [WS_PORT WS_A WS_B]: routing-scripts/path-key.lua
# on each listener; THREADS is the `threads:` line.
bench_ott_conf() {
    local ws_listener="" ws_pool=""
    if [ $# -ge 8 ]; then
        ws_listener="
  - name: ws
    address: 127.0.0.1
    port: $6
    pool: ws
    routing:
      script: $ROOT/routing-scripts/path-key.lua
      options: { prefix: rooms, pool: ws }"
        ws_pool="
  ws:
    backends:
      - { id: ws-1, address: 127.0.0.1:$7 }
      - { id: ws-2, address: 127.0.0.1:$8 }"
    fi
    cat <<CONF
# ott-proxy: routing-scripts/path-key.lua (key = /rooms/{key}, placed by rendezvous hashing) on each listener.
listeners:
  - name: http
    address: 127.0.0.1
    port: $3
    pool: http
    routing:
      script: $ROOT/routing-scripts/path-key.lua
      options: { prefix: rooms, pool: http }$ws_listener
pools:
  http:
    backends:
      - { id: http-1, address: 127.0.0.1:$4 }
      - { id: http-2, address: 127.0.0.1:$5 }$ws_pool
limits:
  max_connections: $2
logging:
  level: warning
  access_log: false
$1
CONF
}
