#!/usr/bin/env bash
# Creates (once) the Python environment of the API conformance test (tests/api/conformance.rs):
# schemathesis from PyPI, pinned, in target/conformance-venv. Prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/conformance-venv
VERSION=4.32.5
if [[ ! -x $VENV/bin/schemathesis ]] || [[ $("$VENV/bin/schemathesis" --version 2>/dev/null) != *"$VERSION"* ]]; then
    command -v python3 >/dev/null || { echo "conformance-venv: python3 is needed" >&2; exit 1; }
    if ! python3 -m venv --help >/dev/null 2>&1; then
        SUDO=(); [[ $(id -u) -eq 0 ]] || SUDO=(sudo)
        "${SUDO[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq python3-venv >/dev/null
    fi
    rm -rf "$VENV"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$VERSION" >&2
fi
echo "$PWD/$VENV/bin/python"
