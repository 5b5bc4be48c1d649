#!/usr/bin/env bash
# The GPU benchmark run (model FLOPs utilization of a 0.5B-class model in bf16, benchmarks/README.md)
# in one prepared command, for a machine that cannot reach a package index.
#
#   bash benchmarks/gpu.sh fetch          # here (with pip and an index): wheels into .whl/
#   bash benchmarks/gpu.sh run [--trl]    # there: install .whl/ into /tmp/site, then benchmark
#
# `fetch` downloads, for CPython 3.12 on manylinux x86_64 (the lent GPU machines' image, which has
# torch, transformers, peft and accelerate but not pydantic), the packages the workers import that
# such an image lacks, plus TRL and what it needs for --trl. `run` writes the report into $OUT
# (or benchmarks/results/), prints nvidia-smi first, and passes any further flags on to
# benchmarks.run, so a smaller shape or fewer stages is `run --only sft,dpo --steps 10`.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
# The workers' needs (posttrain.config is pydantic), then TRL's for --trl (datasets and its own).
PACKAGES=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
          trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

case "${1:-}" in
  fetch)
    mkdir -p "$WHEELS"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do
      platforms+=(--platform "$p")
    done
    python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
      --implementation cp "${platforms[@]}" -d "$WHEELS" "${PACKAGES[@]}"
    ls -l "$WHEELS"
    ;;
  run)
    shift
    trl=()
    if [ "${1:-}" = "--trl" ]; then trl=(--trl); shift; fi
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__)"
    out=${OUT:-benchmarks/results}
    export PYTHONUNBUFFERED=1
    python3 -m benchmarks.run --preset qwen0.5b --threads 0 --label gpu-qwen0.5b \
      --only sft,rm,dpo,orpo,kto,grpo,ppo --out "$out" "${trl[@]}" "$@"
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
