#!/usr/bin/env bash
# The whole GPU check as the project's GPU machine runs it (one `run` call, carrying .gpu):
#   bash bench/gpu_box.sh            # there; writes machine.txt, gpu_check.json, log.txt under $OUT
# Build .gpu/ here first: bash /work/shared/gpu/bundle.sh (Ray + the wheels the image lacks).
# Stages end by 420 s, the run by 555 s: the report is rewritten after each stage, so a run
# cut short still returns what it measured.
set -o pipefail
args=("$@")  # setup.sh sets positional parameters of its own
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -f .gpu/setup.sh ] && [ "${GPU_BUNDLE:-1}" != 0 ]; then source .gpu/setup.sh || exit 3; fi
{ nvidia-smi; nproc; free -g
  python3 -c 'import sys, torch, triton; print(sys.version, torch.__version__, torch.version.cuda, triton.__version__)'
} >"$out/machine.txt" 2>&1
timeout -s INT "${GPU_CHECK_TIMEOUT:-555}" python3 bench/gpu_check.py --out "$out/gpu_check.json" \
  --budget-s "${GPU_CHECK_BUDGET:-420}" --tests-timeout "${GPU_TESTS_TIMEOUT:-170}" "${args[@]}" 2>&1 | tee "$out/log.txt"
