#!/usr/bin/env bash
# The GPU checks in one run, sized for under 8 minutes on one H100: the gpu-marked tests (grouped expert
# products, no host sync in the native layer, MegaBlocks where installed) and the bf16 benchmark with MFU.
# Packages the machine lacks travel as wheels in .whl/ (see docs/distributed.md); logs go to $OUT (or
# /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0),
      'grouped_mm' if hasattr(torch, '_grouped_mm') else 'no grouped_mm')" 2>&1 | tee "$out/env.txt"
timeout 300 python3 -m pytest -q -rs -m gpu tests 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout 150 python3 scripts/benchmark.py --device cuda --dtype bf16 --config lm1b_base --batch 16 \
    --variants native,ds-1.25,dense 2>&1 | tee "$out/benchmark.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmark exit $bench"
exit $(( tests || bench ))
