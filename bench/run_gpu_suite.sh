#!/usr/bin/env bash
# The GPU suite of eplb-service: everything the device does, in one command.
#
#   OUT=/some/dir bash bench/run_gpu_suite.sh [full|smoke]
#
# Writes under $OUT: suite.log (everything printed), p2p.json, harness.json, results.md.
# Steps: environment and versions; tests/gpu; the side communicator's checks and
# peer-to-peer peak (bench.gpu.p2p); the EP-serving harness with the real coordinator and
# agents (bench.gpu.harness: idle, throttled and unthrottled streaming, isolated streaming,
# soak, stop-the-world sync baseline); the results table (bench.gpu.report).
# If .whl/ holds wheels (pyzmq, msgspec for a machine without them), they are installed
# into /tmp/site first. Phase lengths can be overridden: IDLE_S THROTTLED_S UNTHROTTLED_S
# ISOLATED_S SOAK_S, and WORLD (GPUs), PRESET, LAYERS, HARNESS_ARGS (extra flags); SWITCH_INTERVAL_S
# adds a shorter second harness run with that sys.setswitchinterval (the GIL experiment);
# CTA_SWEEP (e.g. 0,16,8,4,2) measures the side communicator's rate under each CTA limit in
# the p2p step; CTA_VARIANTS (e.g. "8 4") adds a shorter harness run per side CTA limit.
set -uo pipefail
MODE=${1:-full}
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
LOG=$OUT/suite.log
: >"$LOG"
step() {  # step NAME TIMEOUT_S CMD...: run, tee into the log, record the exit status
  local name=$1 limit=$2
  shift 2
  echo "== [$(date -u +%H:%M:%S)] $name: $*" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name rc=${PIPESTATUS[0]}" | tee -a "$LOG"
}
{
  echo "== environment ($MODE)"
  date -u
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm --format=csv
  nvidia-smi topo -m
  python3 -c "import sys, torch, cupy; from cupy.cuda import nccl; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl(torch)', torch.cuda.nccl.version(), '| cupy', cupy.__version__, 'nccl(cupy)', nccl.get_version())"
  python3 -c "import zmq, msgspec, uvloop, prometheus_client; print('pyzmq', zmq.__version__, '| msgspec', msgspec.__version__)"
  env | grep -E '^(NCCL|TORCH_SYMM|NVSHMEM)_' | sort
} 2>&1 | tee -a "$LOG"
WORLD=${WORLD:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
PRESET=${PRESET:-qwen35}
LAYER_ARGS=()
[ -n "${LAYERS:-}" ] && LAYER_ARGS=(--layers "$LAYERS")

if [ "$MODE" = smoke ]; then
  step tests 300 python3 -m pytest -q -x -p no:cacheprovider tests/gpu
  step p2p 150 python3 -m bench.gpu.p2p --world "$WORLD" --size-mib 256 --iters 4 --out "$OUT/p2p.json"
  step harness 330 python3 -m bench.gpu.harness --world "$WORLD" --preset "$PRESET" "${LAYER_ARGS[@]}" \
    --idle-s "${IDLE_S:-6}" --throttled-s "${THROTTLED_S:-8}" --unthrottled-s "${UNTHROTTLED_S:-8}" \
    --isolated-s "${ISOLATED_S:-4}" --soak-s "${SOAK_S:-10}" --sync-plans 6 \
    --p2p-json "$OUT/p2p.json" --out "$OUT/harness.json" ${HARNESS_ARGS:-}
else
  step tests 240 python3 -m pytest -q -x -p no:cacheprovider tests/gpu
  step p2p 200 python3 -m bench.gpu.p2p --world "$WORLD" --size-mib 1024 --chunks-mib 64,256,1024 --iters 8 \
    --cta-sweep "${CTA_SWEEP:-}" --out "$OUT/p2p.json"
  step harness 560 python3 -m bench.gpu.harness --world "$WORLD" --preset "$PRESET" "${LAYER_ARGS[@]}" \
    --idle-s "${IDLE_S:-30}" --throttled-s "${THROTTLED_S:-40}" --unthrottled-s "${UNTHROTTLED_S:-30}" \
    --isolated-s "${ISOLATED_S:-15}" --soak-s "${SOAK_S:-150}" --sync-plans 12 \
    --p2p-json "$OUT/p2p.json" --out "$OUT/harness.json" ${HARNESS_ARGS:-}
fi
step report 60 python3 -m bench.gpu.report --p2p "$OUT/p2p.json" --harness "$OUT/harness.json" --out "$OUT/results.md"
if [ -n "${SWITCH_INTERVAL_S:-}" ]; then  # the GIL experiment: the same harness, shorter, another switch interval
  step harness_switch 300 python3 -m bench.gpu.harness --world "$WORLD" --preset "$PRESET" "${LAYER_ARGS[@]}" \
    --idle-s 15 --throttled-s 20 --unthrottled-s 12 --isolated-s 3 --soak-s 20 --sync-plans 2 \
    --switch-interval-s "$SWITCH_INTERVAL_S" --p2p-json "$OUT/p2p.json" --out "$OUT/harness_switch.json" ${HARNESS_ARGS:-}
  step report_switch 60 python3 -m bench.gpu.report --p2p "$OUT/p2p.json" --harness "$OUT/harness_switch.json" --out "$OUT/results_switch.md"
fi
for CTAS in ${CTA_VARIANTS:-}; do  # the same harness, shorter, with the side communicator limited to CTAS CTAs
  step "harness_ctas$CTAS" 300 python3 -m bench.gpu.harness --world "$WORLD" --preset "$PRESET" "${LAYER_ARGS[@]}" \
    --idle-s "${VARIANT_IDLE_S:-12}" --throttled-s "${VARIANT_THROTTLED_S:-15}" --unthrottled-s "${VARIANT_UNTHROTTLED_S:-12}" \
    --isolated-s 5 --soak-s 10 --sync-plans 2 --side-max-ctas "$CTAS" \
    --p2p-json "$OUT/p2p.json" --out "$OUT/harness_ctas$CTAS.json" ${HARNESS_ARGS:-}
  step "report_ctas$CTAS" 60 python3 -m bench.gpu.report --p2p "$OUT/p2p.json" --harness "$OUT/harness_ctas$CTAS.json" --out "$OUT/results_ctas$CTAS.md"
done
grep -E '^== .* rc=' "$LOG"
