#!/usr/bin/env bash
# Shared by the scripts: find Swift, install the Debian packages the project needs when they are missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Debian packages every build and test needs: Lua 5.4 for routing scripts, pkg-config to find it,
# redis-server for the shared ownership directory tests, openssl to make throwaway TLS certificates in tests.
BASE_PACKAGES=(pkg-config liblua5.4-dev redis-server openssl)

# The release build of ott-proxy. Package.swift turns off the run-time exclusivity checks for ProxyCore's own code;
# SwiftPM only takes flags for dependencies from the command line, so this does it for NIO and the rest as well
# (about 5 % more HTTP requests/s and 6 % less CPU per request, docs/benchmarks.md). A plain
# `swift build -c release` works too, a little slower.
RELEASE_BUILD=(swift build -c release -Xswiftc -enforce-exclusivity=unchecked)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "error: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

# ensure_packages PKG...: installs the packages that are not installed yet (apt-get update first, once).
ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing missing packages: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

# ensure_swift: puts a Swift 6.1+ toolchain on PATH or explains where to get one.
ensure_swift() {
    if ! command -v swift >/dev/null 2>&1 && [ -x /opt/swift/usr/bin/swift ]; then
        export PATH="/opt/swift/usr/bin:$PATH"
    fi
    if ! command -v swift >/dev/null 2>&1; then
        echo "error: no Swift toolchain found. Install Swift 6.1 or newer (https://www.swift.org/install/linux/)" >&2
        echo "       and put its usr/bin on PATH, then run this script again." >&2
        exit 1
    fi
}
