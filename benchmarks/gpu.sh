#!/usr/bin/env bash
# The GPU benchmark run (model FLOPs utilization of a 0.5B-class model in bf16, benchmarks/README.md)
# in one prepared command, for a machine that cannot reach a package index.
#
#   bash benchmarks/gpu.sh fetch          # here (with pip and an index): wheels into .whl/
#   bash benchmarks/gpu.sh run [--trl]    # there: install .whl/ into /tmp/site, then benchmark
#   bash benchmarks/gpu.sh fetch-pipeline # here: the wheels `posttrain run` needs there
#   bash benchmarks/gpu.sh pipeline [--smoke]  # there: conf/gpu-pipeline.yaml via posttrain run
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
  fetch-pipeline)
    # `posttrain run` there needs Prefect, MLflow, pydantic and datasets with their closure;
    # resolved for CPython 3.12 here, then only what the image lacks (benchmarks/gpu-image.txt,
    # the image's package list in KINDS.md) goes to .whl/ (2026-12-04: 107 wheels, 61 MiB).
    all=$(mktemp -d)
    platforms=()
    for p in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
             manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
      platforms+=(--platform "$p")
    done
    python3 -m pip download --only-binary=:all: --python-version "$PY_VERSION" \
      --implementation cp "${platforms[@]}" -d "$all" prefect==3.9.1 mlflow==3.17.2 \
      mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 pydantic==2.14.4 datasets==5.2.0 trl==1.16.0
    mkdir -p "$WHEELS"
    python3 - "$all" "$WHEELS" <<'PY'
import re, shutil, sys
from pathlib import Path
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(l) for l in Path("benchmarks/gpu-image.txt").read_text().splitlines()
        if l and not l.startswith("#")}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = norm(wheel.name.split("-")[0])
    if name not in have and not name.startswith(("nvidia-", "cuda-")):
        shutil.copy2(wheel, Path(sys.argv[2]) / wheel.name)
PY
    du -sh "$WHEELS"
    ;;
  pipeline)
    # Issue 16, item 1: conf/gpu-pipeline.yaml through `posttrain run`, stopping at the first
    # stage that fails; --smoke: the same at a tiny shape on CPU, to try the script here
    # (PYTHON=.venv/bin/python: the interpreter, python3 by default as on the lent machine).
    shift
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    out=${OUT:-benchmarks/results}
    mkdir -p "$out"
    overrides=(artifacts_root="$out/artifacts")
    if [ "${1:-}" = "--smoke" ]; then
      shift
      overrides+=(model.dtype=float32 model.tiny.hidden_size=64 model.tiny.num_hidden_layers=2
                  model.tiny.num_attention_heads=4 model.tiny.intermediate_size=128
                  model.tiny.max_position_embeddings=256 stages.sft.max_length=128
                  stages.sft.max_steps=4 stages.reward.max_steps=2 stages.dpo.max_steps=2
                  stages.orpo.max_steps=2 stages.kto.max_steps=2 stages.grpo.max_steps=2
                  stages.ppo.max_steps=2 evaluate.max_prompts=16 demo.num_train=400
                  demo.num_eval=40)
    else
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    fi
    MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$out/mlflow.db} \
      "${PYTHON:-python3}" -m pipelines.cli run conf/gpu-pipeline.yaml "${overrides[@]}" "$@" \
      2>&1 | tee "$out/gpu-pipeline.log"
    ;;
  *)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
