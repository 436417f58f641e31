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
command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
  || need+=(python3-dev)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The package with its test extras, built in place (the Cython extension included).
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 setup.py -q build_ext --inplace >/dev/null

echo "== lint and types"
python3 -m ruff check vmied tests bench
python3 -m mypy

echo "== the suite (Cython kernels)"
python3 -m pytest -q -p no:cacheprovider "$@"

echo "== the kernels' pure-Python twins (VMIED_NO_EXTENSIONS=1) on the format and kernel tests"
VMIED_NO_EXTENSIONS=1 python3 -m pytest -q -p no:cacheprovider tests/test_fastio.py tests/test_extents.py \
  tests/test_vmdk.py -k "not multi_extent"
