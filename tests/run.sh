#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine, then runs all of them.
# Usage: bash tests/run.sh [pytest args...]      (README: "Run the tests")
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: qemu-img is the reference every output is compared with; gcc builds the Cython core.
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v gcc >/dev/null || need+=(gcc)
# The daemon's checks: promtool lints /metrics, systemd-analyze verifies the units.
command -v promtool >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v chromium >/dev/null || need+=(chromium)  # the status page test renders / headless
command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
  || need+=(python3-dev)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Debian's own Python refuses pip installs (PEP 668): use a virtual environment there.
PY=python3
if [ -z "${VIRTUAL_ENV:-}" ] && python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
  python3 -m venv .venv 2>/dev/null || { as_root apt-get install -y -qq python3-venv >/dev/null; python3 -m venv .venv; }
  PY=.venv/bin/python
fi

# The package with its test extras, built in place (the Cython extension included).
$PY -m pip install -q --disable-pip-version-check -e '.[test]'
$PY setup.py -q build_ext --inplace >/dev/null

echo "== lint and types"
$PY -m ruff check vmied tests bench
$PY -m mypy

echo "== the suite (Cython kernels)"
$PY -m pytest -q -p no:cacheprovider "$@"

echo "== the kernels' pure-Python twins (VMIED_NO_EXTENSIONS=1) on the format and kernel tests"
VMIED_NO_EXTENSIONS=1 $PY -m pytest -q -p no:cacheprovider tests/test_fastio.py tests/test_extents.py \
  tests/test_vmdk.py tests/test_damaged.py -k "not multi_extent"
