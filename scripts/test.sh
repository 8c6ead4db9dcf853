#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# The real OCI tools the interoperability tests drive (Debian packages).
need=()
for pair in umoci:umoci skopeo:skopeo docker-registry:docker-registry; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "note: ${need[*]} missing and not root: their tests will be skipped" >&2
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
