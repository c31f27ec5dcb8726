#!/usr/bin/env bash
# Keep-alive HTTP through several proxies, interleaved, with each proxy's CPU per request: the by-hand A/B harness
# behind the per-session comparisons in docs/benchmarks.md (a quicker, narrower companion of bench-compare.sh).
#
#   ./scripts/http-interleave.sh [TARGET...]     # default: raw-relay ott-proxy haproxy
#
# TARGETs, each measured once per round in the order given:
#   ott-proxy           this tree's release build (built first)
#   ott-proxy=PATH      another ott-proxy binary, e.g. a copy of an older build, for a before/after pair
#   haproxy             HAProxy 2.6, configured as in bench-compare.sh
#   raw-relay           ott-proxy's per-request HTTP code, Lua routing included, on plain epoll threads
#                       (Benchmarks/Sources/raw-relay: an estimate of the request path off NIO, not a proxy)
#   raw-relay-nolua     the same, with the key taken from the path natively instead of by the script
#   nio-relay           the bare SwiftNIO byte relay (one origin entry, no parsing): the NIO floor
#
# It starts a 1 KiB nginx origin on two ports; every proxy routes /rooms/{name}/... over both with two threads bound
# one per CPU (nio-relay is not bound and uses one entry). Then ROUNDS rounds of `wrk -t1 -c64 -d${DURATION}s` per
# target, printing requests/s, p99, and the proxy's CPU per request, total and user (from /proc/PID/stat over the run,
# divided by the requests wrk completed). Stops everything it started. ROUNDS=3 DURATION=5 by default: about 20 s per
# target and round after the build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(raw-relay ott-proxy haproxy)
for i in "${!TARGETS[@]}"; do
    target="${TARGETS[$i]}"
    case "$target" in
    ott-proxy | haproxy | raw-relay | raw-relay-nolua | nio-relay) ;;
    ott-proxy=*)
        binary="${target#ott-proxy=}"
        [ -x "$binary" ] || { echo "error: $binary is not an executable" >&2; exit 2; }
        TARGETS[$i]="ott-proxy=$(realpath "$binary")"  # the script changes directory below
        ;;
    *) echo "error: unknown target '$target' (see the header of $0)" >&2; exit 2 ;;
    esac
done

ensure_swift
need=("${BASE_PACKAGES[@]}" wrk haproxy curl)
command -v nginx >/dev/null || need+=(nginx-light)
ensure_packages "${need[@]}"
ulimit -n "$(ulimit -Hn)"

cd "$ROOT"
echo "==> building (release): ott-proxy, raw-relay, nio-relay"
"${RELEASE_BUILD[@]}" --product ott-proxy >/dev/null
"${RELEASE_BUILD[@]}" --package-path Benchmarks --product raw-relay >/dev/null
swift build -c release --package-path Benchmarks --product nio-relay >/dev/null

WORK="$(mktemp -d /tmp/http-interleave.XXXXXX)"
chmod 755 "$WORK"  # nginx workers run as another user
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# The origin, HAProxy and ott-proxy configurations are bench-compare.sh's (scripts/bench-lib.sh), HTTP only, on ports
# of their own (182xx), so both scripts can run without stopping each other's processes.
ORIGIN_PORTS=(18281 18282)
mkdir -p "$WORK/www" "$WORK/origin/logs"
head -c 1024 /dev/zero | tr '\0' 'x' >"$WORK/www/1k"
bench_origin_conf "$WORK/origin" "$WORK/www" "${ORIGIN_PORTS[@]}" "$(ulimit -n)" >"$WORK/origin.conf"
HAPROXY_CPU_MAP="$(bench_cpu_map)"
MAX_CONNECTIONS=$((($(ulimit -n) - 500) / 2))

nginx -p "$WORK/origin" -c "$WORK/origin.conf" >/dev/null 2>&1 &
PIDS+=($!)

# One port per target, from 18230; PID[i] and PORT[i] for TARGETS[i].
declare -a PID PORT NAME
for i in "${!TARGETS[@]}"; do
    target="${TARGETS[$i]}"
    port=$((18230 + i))
    PORT[$i]=$port
    NAME[$i]="$target"
    case "$target" in
    ott-proxy | ott-proxy=*)
        binary="$ROOT/.build/release/ott-proxy"
        if [ "$target" != ott-proxy ]; then binary="${target#ott-proxy=}"; NAME[$i]="ott:$(basename "$binary")"; fi
        bench_ott_conf "threads: { count: 2, cpu_affinity: auto }" "$MAX_CONNECTIONS" "$port" "${ORIGIN_PORTS[@]}" \
            >"$WORK/ott-proxy-$i.yaml"
        "$binary" run --config "$WORK/ott-proxy-$i.yaml" >"$WORK/ott-proxy-$i.log" 2>&1 &
        ;;
    haproxy)
        bench_haproxy_conf "$HAPROXY_CPU_MAP" "$MAX_CONNECTIONS" "$port" "${ORIGIN_PORTS[@]}" >"$WORK/haproxy-$i.cfg"
        haproxy -db -f "$WORK/haproxy-$i.cfg" >"$WORK/haproxy-$i.log" 2>&1 &
        ;;
    raw-relay | raw-relay-nolua)
        script=()
        [ "$target" = raw-relay ] && script=(--script "$ROOT/routing-scripts/path-key.lua" --option prefix=rooms --option pool=http)
        "$ROOT/Benchmarks/.build/release/raw-relay" --port "$port" \
            --origin "127.0.0.1:${ORIGIN_PORTS[0]}" --origin "127.0.0.1:${ORIGIN_PORTS[1]}" \
            --threads 2 --pin "${script[@]}" >"$WORK/raw-relay-$i.log" 2>&1 &
        ;;
    nio-relay)
        "$ROOT/Benchmarks/.build/release/nio-relay" --port "$port" --to "${ORIGIN_PORTS[0]}" --threads 2 >"$WORK/nio-relay-$i.log" 2>&1 &
        ;;
    esac
    PID[$i]=$!
    PIDS+=($!)
done

for i in "${!TARGETS[@]}"; do
    url="http://127.0.0.1:${PORT[$i]}/rooms/bench/1k"
    for _ in $(seq 100); do
        curl -sf -o /dev/null "$url" && break
        sleep 0.1
    done
    curl -sf -o /dev/null "$url" || { echo "error: ${NAME[$i]} does not answer on ${PORT[$i]}" >&2; exit 1; }
done

HZ="$(getconf CLK_TCK)"
measure() { # name pid port
    local before after user_before user_after requests rps p99 errors
    before=$(awk '{print $14 + $15}' "/proc/$2/stat"); user_before=$(awk '{print $14}' "/proc/$2/stat")
    wrk -t1 -c64 -d"${DURATION}s" --latency "http://127.0.0.1:$3/rooms/bench/1k" >"$WORK/wrk.out"
    after=$(awk '{print $14 + $15}' "/proc/$2/stat"); user_after=$(awk '{print $14}' "/proc/$2/stat")
    requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
    p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk.out")
    errors=$(awk '/Non-2xx|Socket errors/ {print}' "$WORK/wrk.out" | tr '\n' ' ')
    awk -v name="$1" -v a="$before" -v b="$after" -v ua="$user_before" -v ub="$user_after" -v n="$requests" \
        -v r="$rps" -v p="$p99" -v e="$errors" -v hz="$HZ" \
        'BEGIN {printf "  %-22s %9.0f req/s   p99 %8s   CPU/request %6.2f us (user %5.2f)  %s\n", name, r, p, (b - a) * 1e6 / hz / n, (ub - ua) * 1e6 / hz / n, e}'
}

for round in $(seq "$ROUNDS"); do
    echo "==> round $round/$ROUNDS"
    for i in "${!TARGETS[@]}"; do measure "${NAME[$i]}" "${PID[$i]}" "${PORT[$i]}"; done
done
