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
# It starts a 1 KiB nginx origin on two ports; every proxy routes /rooms/{name}/... over both with two threads
# (nio-relay uses one entry). AFFINITY=auto (the default) binds ott-proxy's, HAProxy's and raw-relay's threads one per
# CPU, as bench-compare.sh does, and checks with taskset that ott-proxy's and HAProxy's really are; AFFINITY=none
# leaves them to the kernel (and checks that). nio-relay is never bound. Then ROUNDS rounds of
# `wrk -t1 -c64 -d${DURATION}s` per target, printing requests/s, p50, p99, p99.9 (scripts/wrk-percentiles.lua) and the
# proxy's CPU per request, total and user (from /proc/PID/stat over the run, divided by the requests wrk completed).
# Each round starts one target further along the list and every round goes the other way round from the one before,
# so no target is always first, and none always follows the same one; runs are SLEEP seconds apart (1, as in
# bench-compare.sh). Last, each target's medians over the rounds and in how many rounds its p99 was below the first
# target's. Stops everything it started. ROUNDS=3 DURATION=5 by default: about 20 s per target and round after the
# build.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
SLEEP="${SLEEP:-1}"
AFFINITY="${AFFINITY:-auto}"
case "$AFFINITY" in auto | none) ;; *) echo "error: AFFINITY must be auto or none" >&2; exit 2 ;; esac
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
need=("${BASE_PACKAGES[@]}" wrk haproxy curl python3)
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
HAPROXY_CPU_MAP="" OTT_THREADS="threads: { count: 2, cpu_affinity: none }" PIN=()
if [ "$AFFINITY" = auto ]; then
    HAPROXY_CPU_MAP="$(bench_cpu_map)" OTT_THREADS="threads: { count: 2, cpu_affinity: auto }" PIN=(--pin)
fi
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
        bench_ott_conf "$OTT_THREADS" "$MAX_CONNECTIONS" "$port" "${ORIGIN_PORTS[@]}" \
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
            --threads 2 "${PIN[@]}" "${script[@]}" >"$WORK/raw-relay-$i.log" 2>&1 &
        ;;
    nio-relay)
        "$ROOT/Benchmarks/.build/release/nio-relay" --port "$port" --to "${ORIGIN_PORTS[0]}" --threads 2 >"$WORK/nio-relay-$i.log" 2>&1 &
        ;;
    esac
    PID[$i]=$!
    PIDS+=($!)
    for j in $(seq 0 $((i - 1))); do [ "${NAME[$j]}" != "${NAME[$i]}" ] || NAME[$i]="${NAME[$i]}#$((i + 1))"; done
done

for i in "${!TARGETS[@]}"; do
    url="http://127.0.0.1:${PORT[$i]}/rooms/bench/1k"
    for _ in $(seq 100); do
        curl -sf -o /dev/null "$url" && break
        sleep 0.1
    done
    curl -sf -o /dev/null "$url" || { echo "error: ${NAME[$i]} does not answer on ${PORT[$i]}" >&2; exit 1; }
done

# The threads that carry the traffic, checked against AFFINITY (HAProxy 2.6 ignores some cpu-map forms without a word).
for i in "${!TARGETS[@]}"; do
    case "${TARGETS[$i]}" in
    ott-proxy | ott-proxy=*) line="$(bench_affinity ott-proxy "${PID[$i]}")" ;;
    haproxy) line="$(bench_affinity haproxy "${PID[$i]}")" ;;
    *) continue ;;
    esac
    bench_affinity_check "$AFFINITY" "$line"
    echo "==> ${NAME[$i]}: threads and the CPUs they may run on: ${line#* }"
done

HZ="$(getconf CLK_TCK)"
RESULTS="$WORK/results.tsv"
measure() { # round name pid port
    local before after user_before user_after line requests
    before=$(awk '{print $14 + $15}' "/proc/$3/stat"); user_before=$(awk '{print $14}' "/proc/$3/stat")
    wrk -t1 -c64 -d"${DURATION}s" -s "$ROOT/scripts/wrk-percentiles.lua" "http://127.0.0.1:$4/rooms/bench/1k" >"$WORK/wrk.out"
    after=$(awk '{print $14 + $15}' "/proc/$3/stat"); user_after=$(awk '{print $14}' "/proc/$3/stat")
    line="$(grep '^percentiles ' "$WORK/wrk.out")" || { echo "error: wrk printed no percentiles for $2" >&2; cat "$WORK/wrk.out" >&2; exit 1; }
    requests="$(tr ' ' '\n' <<<"$line" | awk -F= '$1 == "requests" {print $2}')"
    # round name rps p50 p99 p99.9 cpu user errors
    tr ' ' '\n' <<<"$line" | awk -F= -v round="$1" -v name="$2" -v a="$before" -v b="$after" -v ua="$user_before" \
        -v ub="$user_after" -v n="$requests" -v hz="$HZ" '
        { v[$1] = $2 }
        END {
            cpu = n > 0 ? (b - a) * 1e6 / hz / n : 0; user = n > 0 ? (ub - ua) * 1e6 / hz / n : 0
            printf "%s\t%s\t%s\t%s\t%s\t%s\t%.2f\t%.2f\t%s\n", round, name, v["rps"], v["p50"], v["p99"], v["p99.9"], cpu, user, v["errors"] >> "'"$RESULTS"'"
            printf "  %-22s %9.0f req/s   p50 %6.2f   p99 %6.2f   p99.9 %6.2f ms   CPU/request %6.2f us (user %5.2f)%s\n",
                name, v["rps"], v["p50"], v["p99"], v["p99.9"], cpu, user, (v["errors"] > 0 ? "   errors " v["errors"] : "")
        }'
}

for round in $(seq "$ROUNDS"); do
    order=($(bench_round_order "$round" "${#TARGETS[@]}"))
    echo "==> round $round/$ROUNDS (order: $(for i in "${order[@]}"; do printf '%s ' "${NAME[$i]}"; done))"
    for i in "${order[@]}"; do
        measure "$round" "${NAME[$i]}" "${PID[$i]}" "${PORT[$i]}"
        sleep "$SLEEP"
    done
done

echo "==> medians over $ROUNDS rounds (AFFINITY=$AFFINITY); the last column: rounds in which the p99 was below ${NAME[0]}'s"
python3 - "$RESULTS" "${NAME[@]}" <<'PY'
import statistics, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
names = sys.argv[2:]
by = {name: {int(r[0]): r for r in rows if r[1] == name} for name in names}
first = by[names[0]]
for name in names:
    mine = by[name]
    med = lambda col: statistics.median(float(r[col]) for r in mine.values())
    below = "" if name == names[0] else "%d of %d" % (
        sum(1 for k, r in mine.items() if k in first and float(r[4]) < float(first[k][4])), len(mine))
    print("  %-22s %9.0f req/s   p50 %6.2f   p99 %6.2f   p99.9 %6.2f ms   CPU/request %6.2f us (user %5.2f)   %s"
          % (name, med(2), med(3), med(4), med(5), med(6), med(7), below))
PY
