#!/bin/sh
# The wheels bench/gpu.py needs on a GPU machine whose image has torch, transformers, peft, accelerate,
# sentencepiece, safetensors and matplotlib but no pydantic: pydantic and what it needs, for CPython 3.12 on x86-64
# Linux, at the versions this checkout's virtualenv runs. Run from the repository root; it fills .whl/ (git-ignored).
# On the GPU machine, first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
set -e
PY=${PY:-.venv/bin/python}
mkdir -p .whl
for pkg in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  version=$($PY -c "import importlib.metadata as m; print(m.version('$pkg'))")
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$version"
done
ls -l .whl
