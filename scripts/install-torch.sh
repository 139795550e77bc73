#!/usr/bin/env bash
# Installs the pinned torch into the virtualenv whose pip is $1, choosing the build:
#   1. a wheel pip can already find without an index (a local wheelhouse in pip's find-links): no download;
#   2. a visible NVIDIA GPU (nvidia-smi works): the default build from PyPI, which is the CUDA one on Linux,
#      with its nvidia-* packages (not in the locks: they are the CUDA build's own);
#   3. otherwise the CPU-only build from PyTorch's CPU index ($TORCH_CPU_INDEX), ~200 MB instead of
#      several GB, falling back to PyPI's default build if that index cannot be reached.
# Set TORCH_INDEX_URL to skip the choice and install from that index.
# Run it after `pip install --require-hashes -r requirements.lock` (or requirements-dev.lock), as the
# Makefile does: torch is the one package the locks leave out, and they pin the CPU build's dependencies,
# so the CPU builds go in with --no-deps and this script checks that nothing torch needs is missing.
set -euo pipefail
pip="$1"
version="$(sed -n 's/.*"torch==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")"
cpu_index="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
deps_locked() {  # torch's own requirements are all installed (from the lock)
  if "$pip" check 2>/dev/null | grep -i '^torch '; then
    echo "torch $version: dependencies missing; install requirements.lock or requirements-dev.lock first" >&2
    return 1
  fi
}
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$pip" install -q --index-url "$TORCH_INDEX_URL" "torch==$version"
  exit 0
fi
if "$pip" install -q --no-index --no-deps "torch==$version" 2>/dev/null; then
  deps_locked
  echo "torch $version: installed from a local wheel"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  "$pip" install -q "torch==$version" && echo "torch $version: the CUDA build (a GPU is visible)"
elif "$pip" install -q --timeout 20 --retries 1 --no-deps --index-url "$cpu_index" "torch==$version"; then
  deps_locked
  echo "torch $version: the CPU build from $cpu_index"
else
  echo "torch $version: $cpu_index could not be reached; installing PyPI's default build (CUDA, several GB)" >&2
  "$pip" install -q "torch==$version"
fi
