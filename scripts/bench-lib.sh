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

# bench_cpu_map: HAProxy's cpu-map lines binding its two threads to the first two CPUs this script may run on.
bench_cpu_map() {
    local a b
    read -r a b <<<"$(python3 -c 'import os; c = sorted(os.sched_getaffinity(0)); print(f"{c[0]}-{c[0]}" if len(c) < 2 else f"{c[0]} {c[1]}")')"
    printf 'cpu-map 1/1 %s\n    cpu-map 1/2 %s' "$a" "${b:-$a}"
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
