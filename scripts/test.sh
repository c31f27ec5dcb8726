#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test (unit, integration, Lua, Redis). CI runs exactly this.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_swift
ensure_packages "${BASE_PACKAGES[@]}"
cd "$ROOT"
echo "==> building (debug, with tests)"
swift build --build-tests
# Two runs of the one test binary. First the unit-test targets and the Redis client's parser and configuration
# tests: several of them compute for seconds (placement simulations, parser fuzzing) on the threads Swift concurrency
# runs every test on (one per core). Run beside the end-to-end tests they held those threads for up to 8 s at the
# start of the run, so a Task.sleep of 10 ms came back seconds late and timeouts in those tests fired (health checks,
# connect and command timeouts). Then the end-to-end tests (IntegrationTests, the Redis client against redis-server)
# among themselves: the longest such stall measured there was 0.4 s.
PURE='^(PlacementTests|LuaRoutingTests|DemoBackendsTests|ProxyCoreTests)\.|^RedisDirectoryTests\.(RESPDecoderTests|RESPEncoderTests|RedisConfigurationTests)/'
echo "==> running tests: units"
swift test --skip-build --filter "$PURE"
echo "==> running tests: end to end"
swift test --skip-build --skip "$PURE"
