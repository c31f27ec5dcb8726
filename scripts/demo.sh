#!/usr/bin/env bash
# Installs what is missing, builds, and runs the demo: three in-process room servers behind the proxy on its
# embedded defaults (proxy on 127.0.0.1:8080, admin on 127.0.0.1:9901). Extra arguments go to `ott-proxy demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_swift
ensure_packages "${BASE_PACKAGES[@]}"
cd "$ROOT"
"${RELEASE_BUILD[@]}" --product ott-proxy
exec "$ROOT/.build/release/ott-proxy" demo "$@"
