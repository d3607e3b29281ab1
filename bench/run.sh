#!/usr/bin/env bash
# Thin wrapper: run the side-by-side benchmark from anywhere with Plinth's virtual environment.
# Example: bench/run.sh --workers 1 2
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/run.py "$@"
