#!/usr/bin/env bash
# Creates .llvenv (git-ignored) with LiteLLM proxy for the side-by-side benchmark, once.
# Kept apart from Plinth's .venv so that neither project's dependencies change the other's.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .llvenv/bin/litellm ]]; then
  echo "LiteLLM already installed: $(.llvenv/bin/python -c 'import importlib.metadata as m; print(m.version("litellm"))')"
  exit 0
fi
python3 -m venv .llvenv
.llvenv/bin/pip install --quiet 'litellm[proxy]'
echo "LiteLLM installed: $(.llvenv/bin/python -c 'import importlib.metadata as m; print(m.version("litellm"))')"
