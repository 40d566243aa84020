#!/usr/bin/env bash
# The GPU check as one command (see bench/gpu_check.py): run from the repository root on a machine with CUDA.
# Python packages the GPU machine lacks travel as wheels in .whl/ (made here by `bench/gpu_check.sh --fetch`,
# for Python 3.12 x86-64); they are installed into /tmp/site first. Results: $OUT (or runs/gpu-check)/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(megatron-core==0.16.1 webdataset==1.0.2 braceexpand pydantic==2.14.4 pydantic_core==2.50.5
          annotated-types typing-inspection datasketch==2.0.0 zstandard==0.25.0 hjson==3.1.0)
if [[ "${1:-}" == "--fetch" ]]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${PACKAGES[@]}"
  python3 -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8  # an sdist, pure Python
  exit 0
fi
if compgen -G ".whl/*" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu-check}"
echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${SHARDFORGE_COMMIT:-unknown}")" | tee "$out.commit.txt" 2>/dev/null || true
python3 bench/gpu_check.py "$out" "$@"
