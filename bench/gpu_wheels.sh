#!/usr/bin/env bash
# Wheels bench/gpu.py needs on a GPU machine that has Python 3.12, jax and torch but no
# network: keras, keras-hub, transformers, peft and what they import that such a machine
# may lack (about 40 MB). Run here, then carry bench/wheels/ to the machine and pass
# `--wheels bench/wheels`; bench/gpu.py installs only those missing (--no-deps).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels \
    keras==3.15.1 keras-hub==0.32.0 transformers==5.25.0 peft==0.21.2 accelerate \
    namex optree rich markdown-it-py mdurl pygments absl-py h5py ml-dtypes packaging regex \
    safetensors tokenizers huggingface-hub hf-xet httpx2 httpcore2 truststore anyio idna \
    certifi h11 sniffio click filelock fsspec tqdm pyyaml psutil typing-extensions kernels \
    tomlkit typer shellingham annotated-doc pydantic pydantic-core annotated-types \
    typing-inspection
du -sh wheels
