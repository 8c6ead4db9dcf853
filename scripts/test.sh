#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# The real OCI tools the interoperability tests drive, and the image-spec's own schema/
# (its Go test tables, which tests/test_schema_cases.py checks its copy against): Debian
# packages, each found by a command or, for a path, a file it installs.
need=()
for pair in umoci:umoci skopeo:skopeo docker-registry:docker-registry \
    /usr/share/gocode/src/github.com/opencontainers/image-spec/schema/descriptor_test.go:golang-github-opencontainers-image-spec-dev; do
    marker="${pair%:*}" package="${pair##*:}"
    if [[ "$marker" == /* ]]; then
        [ -e "$marker" ] || need+=("$package")
    else
        command -v "$marker" >/dev/null 2>&1 || need+=("$package")
    fi
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
# one worker per core (pytest-xdist): much of the suite waits on fsync, subprocesses and sockets;
# OCICAS_TEST_WORKERS=0 runs it in this process
exec .venv/bin/python -m pytest -n "${OCICAS_TEST_WORKERS:-auto}" "$@"
