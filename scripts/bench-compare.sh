#!/usr/bin/env bash
# ott-proxy side by side with HAProxy 2.6 and nginx 1.22, on loopback, in one run (issue 7).
#
# Installs what is missing (apt: haproxy, nginx-light, wrk, python3-matplotlib), builds ott-proxy and the load tools
# (Benchmarks/: ws-echo-origin, ws-load) in release mode, starts one shared origin (nginx serving 1 KiB on two ports,
# ws-echo-origin on two ports) and the three proxies configured equivalently (route by the key in /rooms/{key}/...
# with consistent hashing over a pool of two origin entries, WebSocket pass-through), then measures, interleaved per
# proxy (origin direct / HAProxy / nginx / ott-proxy / nio-relay for metric 1, then metric 2, ...):
#   1. idle WebSockets: proxy RSS per connection, IDLE_N connections held open (fresh proxies, measured first)
#   2. HTTP/1.1 keep-alive, 1 KiB, 64 connections (wrk --latency): requests/s, p50, p99
#   3. WebSocket echo, 1,000 connections, 64-byte messages, one in flight each (ws-load): messages/s, p50, p99
#   4. new connections/s: HTTP/1.1 with `Connection: close`, 64 connections (wrk)
# and, for 2 and 3, each proxy's CPU time (utime + stime from /proc) per request and per message.
# `nio-relay` (Benchmarks/) is a reference row, not a contender: a bare SwiftNIO byte relay with one origin connection
# per client connection and no parsing or routing, i.e. the floor any SwiftNIO proxy pays. ott-proxy's own cost is its
# difference to that row.
# CPU affinity (AFFINITY=auto, the default): the three proxies bind their 2 threads/workers one per CPU, each with its
# own setting (HAProxy `cpu-map`, nginx `worker_cpu_affinity auto`, ott-proxy `threads.cpu_affinity: auto`), so all
# three get the same treatment; AFFINITY=none leaves every process to the kernel. Origins and nio-relay are not bound.
# Metrics 2-4 are repeated ROUNDS times (round-robin over the targets, each round starting one target later) and the
# median is reported.
# Writes the "Side by side" section of docs/benchmarks.md (other sections kept) and docs/bench/*.png.
# Everything it starts is stopped on exit. Bounded: about 6 minutes with the defaults once built.
#
#   usage: scripts/bench-compare.sh            (env: DURATION=6 ROUNDS=3 IDLE_N=9000 WS_CONNS=1000 HTTP_CONNS=64
#                                                    AFFINITY=auto|none)
#          NO_DOCS=1 scripts/bench-compare.sh  (print the results, leave docs/ alone)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

DURATION="${DURATION:-6}"      # seconds per measured run
ROUNDS="${ROUNDS:-3}"          # interleaved repetitions of the throughput metrics
IDLE_N="${IDLE_N:-9000}"       # idle WebSockets per proxy (2 fds each in the proxy: must fit the fd limit)
WS_CONNS="${WS_CONNS:-1000}"
HTTP_CONNS="${HTTP_CONNS:-64}"
AFFINITY="${AFFINITY:-auto}"
case "$AFFINITY" in auto | none) ;; *) echo "error: AFFINITY must be auto or none" >&2; exit 2 ;; esac
WS_SIZE=64

HTTP_ORIGIN_PORTS=(18081 18082)
WS_ORIGIN_PORTS=(18091 18092)
declare -A HTTP_PORT=([origin]=18081 [haproxy]=18110 [nginx]=18120 [ott-proxy]=18130 [nio-relay]=18140)
declare -A WS_PORT=([origin]=18091 [haproxy]=18111 [nginx]=18121 [ott-proxy]=18131 [nio-relay]=18141)
TARGETS=(origin haproxy nginx ott-proxy nio-relay)
PROXIES=(haproxy nginx ott-proxy nio-relay)

# ---------------------------------------------------------------------------------------------------------- setup
ensure_swift
need=("${BASE_PACKAGES[@]}" wrk haproxy curl procps)
command -v nginx >/dev/null || need+=(nginx-light)
PY=python3
if ! $PY -c 'import matplotlib' 2>/dev/null; then
    PY=/usr/bin/python3
    $PY -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
fi
ensure_packages "${need[@]}"

# The proxy needs 2 fds per tunnel; every process here may open up to the hard limit.
ulimit -n "$(ulimit -Hn)"
FD_LIMIT="$(ulimit -n)"
if [ $((IDLE_N * 2 + 500)) -gt "$FD_LIMIT" ]; then
    echo "error: IDLE_N=$IDLE_N needs $((IDLE_N * 2 + 500)) fds in the proxy, the limit is $FD_LIMIT" >&2
    exit 1
fi

cd "$ROOT"
echo "==> building (release): ott-proxy, ws-echo-origin, ws-load, nio-relay"
"${RELEASE_BUILD[@]}" --product ott-proxy >/dev/null
swift build -c release --package-path Benchmarks --product ws-load >/dev/null
swift build -c release --package-path Benchmarks --product nio-relay >/dev/null
swift build -c release --package-path Benchmarks --product ws-echo-origin >/dev/null
OTT="$ROOT/.build/release/ott-proxy"
WS_LOAD="$ROOT/Benchmarks/.build/release/ws-load"
WS_ECHO="$ROOT/Benchmarks/.build/release/ws-echo-origin"
NIO_RELAY="$ROOT/Benchmarks/.build/release/nio-relay"

WORK="$(mktemp -d /tmp/bench-compare.XXXXXX)"
chmod 755 "$WORK"  # nginx workers run as www-data and read $WORK/www
RESULTS="$WORK/results.tsv"
COMMANDS="$WORK/commands.txt"
FACTS="$WORK/facts.txt"
: >"$RESULTS"; : >"$COMMANDS"; : >"$FACTS"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -z "${KEEP_WORK:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

START_TIME=$(date +%s)
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"

# -------------------------------------------------------------------------------------------------- configurations
# HAProxy's cpu-map binds its threads to the first two CPUs this script may run on (bench_cpu_map); nginx and
# ott-proxy find theirs themselves. bench_affinity_check verifies the outcome once they run.
HAPROXY_CPU_MAP="" NGINX_CPU_AFFINITY="" OTT_THREADS="threads: { count: 2 }"
if [ "$AFFINITY" = auto ]; then
    HAPROXY_CPU_MAP="$(bench_cpu_map)"
    NGINX_CPU_AFFINITY="worker_cpu_affinity auto;"
    OTT_THREADS="threads: { count: 2, cpu_affinity: auto }"
fi
mkdir -p "$WORK/www" "$WORK/origin/logs" "$WORK/nginx/logs" "$WORK/haproxy" "$WORK/ott"
head -c 1024 /dev/zero | tr '\0' 'x' >"$WORK/www/1k"

bench_origin_conf "$WORK/origin" "$WORK/www" "${HTTP_ORIGIN_PORTS[@]}" "$FD_LIMIT" >"$WORK/origin/nginx.conf"

bench_haproxy_conf "$HAPROXY_CPU_MAP" $(((FD_LIMIT - 500) / 2)) "${HTTP_PORT[haproxy]}" "${HTTP_ORIGIN_PORTS[@]}" \
    "${WS_PORT[haproxy]}" "${WS_ORIGIN_PORTS[@]}" >"$WORK/haproxy/haproxy.cfg"

cat >"$WORK/nginx/nginx.conf" <<CONF
# nginx as the proxy: key extracted from /rooms/{key}/... by a map, \`hash \$key consistent\` over two entries,
# upstream keep-alive for HTTP, Upgrade/Connection relayed for WebSocket.
worker_processes 2;
$NGINX_CPU_AFFINITY
daemon off;
error_log $WORK/nginx/logs/error.log warn;
pid $WORK/nginx/nginx.pid;
worker_rlimit_nofile $FD_LIMIT;
events { worker_connections $((FD_LIMIT - 500)); }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    map \$uri \$room_key {
        ~^/rooms/(?<k>[^/]+) \$k;
        default \$uri;
    }
    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      '';
    }
    upstream http_origin {
        hash \$room_key consistent;
        server 127.0.0.1:${HTTP_ORIGIN_PORTS[0]};
        server 127.0.0.1:${HTTP_ORIGIN_PORTS[1]};
        keepalive 64;
    }
    upstream ws_origin {
        hash \$room_key consistent;
        server 127.0.0.1:${WS_ORIGIN_PORTS[0]};
        server 127.0.0.1:${WS_ORIGIN_PORTS[1]};
    }
    proxy_http_version 1.1;
    proxy_set_header Host \$http_host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    server {
        listen 127.0.0.1:${HTTP_PORT[nginx]} backlog=4096;
        location / {
            proxy_pass http://http_origin;
            proxy_set_header Connection "";
        }
    }
    server {
        listen 127.0.0.1:${WS_PORT[nginx]} backlog=4096;
        location / {
            proxy_pass http://ws_origin;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }
    }
}
CONF

bench_ott_conf "$OTT_THREADS" $(((FD_LIMIT - 500) / 2)) "${HTTP_PORT[ott-proxy]}" "${HTTP_ORIGIN_PORTS[@]}" \
    "${WS_PORT[ott-proxy]}" "${WS_ORIGIN_PORTS[@]}" >"$WORK/ott/proxy.yaml"

# ------------------------------------------------------------------------------------------------------- start all
declare -A PID
start() { # name cmd...
    echo "$ ${*:2}" >>"$COMMANDS"
    "${@:2}" >"$WORK/$1.out" 2>&1 &
    PID[$1]=$!
    pids+=($!)
}
"$OTT" check --config "$WORK/ott/proxy.yaml" >/dev/null
haproxy -c -q -f "$WORK/haproxy/haproxy.cfg"
nginx -t -q -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf"

# Every port must be free: HAProxy binds with SO_REUSEPORT, so a leftover process on a port would silently take half
# of that port's connections and skew the figures instead of failing the bind.
for port in "${HTTP_PORT[@]}" "${WS_PORT[@]}" "${HTTP_ORIGIN_PORTS[@]}" "${WS_ORIGIN_PORTS[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "error: something already listens on 127.0.0.1:$port; stop it first (e.g. ss -ltnp | grep :$port)" >&2
        exit 1
    fi
done
echo "==> starting origins and proxies on 127.0.0.1"
start origin-nginx nginx -p "$WORK/origin" -c "$WORK/origin/nginx.conf"
start ws-echo "$WS_ECHO" --host 127.0.0.1 --port "${WS_ORIGIN_PORTS[0]}" --port "${WS_ORIGIN_PORTS[1]}" --threads 1
start haproxy haproxy -db -f "$WORK/haproxy/haproxy.cfg"
start nginx nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf"
start ott-proxy "$OTT" run --config "$WORK/ott/proxy.yaml"
# one origin entry each (no routing): the SwiftNIO floor, see the header
start nio-relay-http "$NIO_RELAY" --port "${HTTP_PORT[nio-relay]}" --to "${HTTP_ORIGIN_PORTS[0]}" --threads 2
start nio-relay-ws "$NIO_RELAY" --port "${WS_PORT[nio-relay]}" --to "${WS_ORIGIN_PORTS[0]}" --threads 2

wait_http() { # url
    for _ in $(seq 150); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
    echo "error: $1 did not answer" >&2; exit 1
}
for t in "${TARGETS[@]}"; do wait_http "http://127.0.0.1:${HTTP_PORT[$t]}/rooms/bench/1k"; done
wait_tcp() { # port
    for _ in $(seq 150); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
    echo "error: 127.0.0.1:$1 does not accept connections" >&2; exit 1
}
for p in "${WS_ORIGIN_PORTS[@]}"; do wait_tcp "$p"; done

# every process that makes up a proxy (nginx: master and its workers)
proxy_pids() {
    if [ "$1" = nio-relay ]; then echo "${PID[nio-relay-http]},${PID[nio-relay-ws]}"; return; fi
    local p=${PID[$1]}
    if [ "$1" = nginx ]; then echo "$p$(pgrep -P "$p" | sed 's/^/,/' | tr -d '\n')"; else echo "$p"; fi
}

# What each proxy's working threads may really run on, checked against AFFINITY (a setting a proxy ignores without a
# word, as HAProxy 2.6 does with `cpu-map 1/1 0`, would otherwise compare a bound proxy with an unbound one).
AFFINITY_SEEN=()
for t in haproxy nginx ott-proxy; do
    if [ "$t" = nginx ]; then line="$(bench_affinity nginx $(pgrep -P "${PID[nginx]}"))"; else line="$(bench_affinity "$t" "${PID[$t]}")"; fi
    bench_affinity_check "$AFFINITY" "$line"
    AFFINITY_SEEN+=("$line")
done
echo "==> threads and the CPUs they may run on: $(IFS=';'; echo "${AFFINITY_SEEN[*]}")"

# CPU time (utime + stime, clock ticks) used so far by every process of a proxy; empty for the origin target.
cpu_ticks() { # target
    [ "$1" != origin ] || return 0
    local total=0 pid
    for pid in $(proxy_pids "$1" | tr ',' ' '); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    echo "$total"
}
# proxy CPU per unit of work in microseconds: ticks-before ticks-after count
cpu_us() {
    if [ -n "$1" ] && [ "${3:-0}" != 0 ]; then
        awk -v a="$1" -v b="$2" -v n="$3" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", (b - a) * 1e6 / hz / n }'
    fi
}

rec() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$RESULTS"; } # round test target field value
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'; }
log_cmd() { [ "$1" != 1 ] || echo "$ ${*:2}" >>"$COMMANDS"; }  # round cmd...: record the first round's commands

# wrk run: round test target extra-args...
run_wrk() {
    local round=$1 test=$2 target=$3; shift 3
    local url="http://127.0.0.1:${HTTP_PORT[$target]}/rooms/bench/1k"
    local cmd=(wrk -t1 -c"$HTTP_CONNS" -d"${DURATION}s" --latency "$@" "$url")
    log_cmd "$round" "${cmd[@]}"
    local before after
    before="$(cpu_ticks "$target")"
    local out; out="$(timeout $((DURATION + 30)) "${cmd[@]}" 2>&1)" || true
    after="$(cpu_ticks "$target")"
    local rps p50 p99 errs non2xx requests
    rps="$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
    p50="$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")")"
    p99="$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")"
    errs="$(awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}' <<<"$out")"
    non2xx="$(awk '/Non-2xx/ {print $NF}' <<<"$out")"
    rec "$round" "$test" "$target" rps "${rps:-0}"
    rec "$round" "$test" "$target" p50_ms "$p50"
    rec "$round" "$test" "$target" p99_ms "$p99"
    rec "$round" "$test" "$target" errors "$(( ${errs:-0} + ${non2xx:-0} ))"
    requests="$(awk '/requests in/ {print $1}' <<<"$out")"
    rec "$round" "$test" "$target" cpu_us "$(cpu_us "$before" "$after" "${requests:-0}")"
    printf '  %-10s %-5s round %s: %10s req/s  p50 %8s ms  p99 %8s ms  errors %s\n' \
        "$target" "$test" "$round" "${rps:-0}" "$p50" "$p99" "$(( ${errs:-0} + ${non2xx:-0} ))"
}

# ws-load run: round target
run_ws() {
    local round=$1 target=$2
    local cmd=("$WS_LOAD" echo --host 127.0.0.1 --port "${WS_PORT[$target]}" --connections "$WS_CONNS" --size "$WS_SIZE"
        --warmup 1 --duration "$DURATION" --threads 1 --concurrency 100)
    log_cmd "$round" "${cmd[@]}"
    local before after
    before="$(cpu_ticks "$target")"
    local out; out="$(timeout $((DURATION + 60)) "${cmd[@]}" 2>&1)" || true
    after="$(cpu_ticks "$target")"
    local line; line="$(grep '^result' <<<"$out" || echo 'result')"
    local field
    for field in msgs_per_s p50_ms p99_ms failed still_open; do
        rec "$round" ws "$target" "$field" "$(tr ' ' '\n' <<<"$line" | awk -F= -v f="$field" '$1==f {print $2}')"
    done
    # Over the whole ws-load run (connecting, 1 s warm-up, the measured seconds) per message of the measured part.
    local messages; messages="$(tr ' ' '\n' <<<"$line" | awk -F= '$1=="messages" {print $2}')"
    rec "$round" ws "$target" cpu_us "$(cpu_us "$before" "$after" "${messages:-0}")"
    printf '  %-10s ws    round %s: %s\n' "$target" "$round" "${line#result }"
    grep -v '^result' <<<"$out" | head -3 || true
}

# idle run: target (round 0)
run_idle() {
    local target=$1
    local cmd=("$WS_LOAD" idle --host 127.0.0.1 --port "${WS_PORT[$target]}" --connections "$IDLE_N" --concurrency 100
        --settle 3 --rss-pids "$(proxy_pids "$target")")
    echo "$ ${cmd[*]}" >>"$COMMANDS"
    local out; out="$(timeout 180 "${cmd[@]}" 2>&1)" || true
    local line; line="$(grep '^result' <<<"$out" || echo 'result')"
    local field
    for field in bytes_per_conn opened still_open failed rss_before_kib rss_after_kib connect_seconds; do
        rec 0 idle "$target" "$field" "$(tr ' ' '\n' <<<"$line" | awk -F= -v f="$field" '$1==f {print $2}')"
    done
    printf '  %-10s idle: %s\n' "$target" "${line#result }"
    grep -v '^result' <<<"$out" | head -3 || true
}

# ------------------------------------------------------------------------------------------------------- measure
echo "==> warm-up (2 s of HTTP per target, 50 WebSockets through each)"
for t in "${TARGETS[@]}"; do
    wrk -t1 -c"$HTTP_CONNS" -d2s "http://127.0.0.1:${HTTP_PORT[$t]}/rooms/bench/1k" >/dev/null 2>&1 || true
    "$WS_LOAD" echo --port "${WS_PORT[$t]}" --connections 50 --warmup 0 --duration 1 >/dev/null 2>&1 || true
done
sleep 1

echo "==> idle WebSockets: $IDLE_N per proxy (fd limit $FD_LIMIT per process; the proxy holds 2 fds per tunnel)"
for t in "${PROXIES[@]}"; do
    run_idle "$t"
    sleep 3  # let the closes drain before the next proxy
done

for round in $(seq "$ROUNDS"); do
    # Each round starts with a different target, and every other round runs backwards, so no proxy is always measured
    # in the same position (right after the origin, or last) nor always right after the same target.
    order=()
    for k in $(bench_round_order "$round" "${#TARGETS[@]}"); do order+=("${TARGETS[$k]}"); done
    echo "==> round $round/$ROUNDS: HTTP keep-alive (order: ${order[*]})"
    for t in "${order[@]}"; do run_wrk "$round" http "$t"; sleep 1; done
    echo "==> round $round/$ROUNDS: WebSocket echo"
    for t in "${order[@]}"; do run_ws "$round" "$t"; sleep 1; done
    echo "==> round $round/$ROUNDS: new connections (Connection: close)"
    for t in "${order[@]}"; do run_wrk "$round" conn "$t" -H 'Connection: close'; sleep 1; done
done

# ------------------------------------------------------------------------------------------------------- report
END_TIME=$(date +%s)
{
    echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
    echo "commit=$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- Sources || echo '+dirty')"
    echo "nproc=$(nproc)"
    echo "cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "memory=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "kernel=$(uname -sr)"
    echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "haproxy=$(haproxy -v | head -1)"
    echo "nginx=$(nginx -v 2>&1)"
    echo "wrk=$(wrk -v 2>&1 | head -1)"
    echo "swift=$(swift --version 2>&1 | head -1)"
    echo "fd_limit=$FD_LIMIT"
    echo "affinity=$AFFINITY"
    echo "affinity_seen=$(IFS=';'; echo "${AFFINITY_SEEN[*]}")"
    echo "load_before=$LOAD_BEFORE"
    echo "load_after=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "elapsed_s=$((END_TIME - START_TIME))"
    echo "duration=$DURATION"
    echo "rounds=$ROUNDS"
    echo "idle_n=$IDLE_N"
    echo "ws_conns=$WS_CONNS"
    echo "http_conns=$HTTP_CONNS"
} >"$FACTS"
mkdir -p "$WORK/configs"
cp "$WORK/haproxy/haproxy.cfg" "$WORK/nginx/nginx.conf" "$WORK/ott/proxy.yaml" "$WORK/configs/"
cp "$WORK/origin/nginx.conf" "$WORK/configs/origin-nginx.conf"

if [ -n "${NO_DOCS:-}" ]; then
    $PY "$ROOT/scripts/bench-report.py" --results "$RESULTS" --facts "$FACTS" --commands "$COMMANDS" \
        --configs "$WORK/configs" --work "$WORK" --print-only
else
    $PY "$ROOT/scripts/bench-report.py" --results "$RESULTS" --facts "$FACTS" --commands "$COMMANDS" \
        --configs "$WORK/configs" --work "$WORK" --doc "$ROOT/docs/benchmarks.md" --charts "$ROOT/docs/bench"
fi
echo "==> done in $((END_TIME - START_TIME)) s"
