#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test (unit, integration, Lua, Redis). CI runs exactly this.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_swift
ensure_packages "${BASE_PACKAGES[@]}"
cd "$ROOT"
echo "==> building (debug, with tests)"
swift build --build-tests
echo "==> running tests"
swift test --skip-build
