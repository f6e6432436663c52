#!/usr/bin/env bash
# Set up this checkout for development: torch first (the CPU build, so that no multi-GB CUDA
# build is pulled on a CPU machine; set TORCH_SPEC to choose another), then the package with
# every extra. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[dev]"
