#!/bin/bash
# On the GPU machine (python3 with torch, cupy and mpi4py already there, no network): install
# this package, run the GPU tests and the CPU tests of the device path, then a short CUDA
# bench side by side with gloo (4 ranks on one GPU). At most 70 + 170 + 2 x 40 + 40 + 70 + 30 s
# after the install: under 8 minutes.
# Logs go to $OUT when it is set (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/topocomm-gpu}
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 ||
    { tail -20 "$OUT/install.log"; exit 1; }
python3 - <<'PY'
import torch, comms
from comms.kernels import native, device_copy
native.impl()
from comms.kernels import cuda
from comms.transport import cuda_ipc
print("torch", torch.__version__, "cuda", torch.version.cuda, "| C helpers:", native.is_native,
      "| copy engine:", getattr(device_copy.engine(), "name", None), device_copy.unavailable(),
      "| kernels:", getattr(cuda.kernels(), "name", None), cuda.unavailable(), cuda.passed_over(),
      "| ipc:", getattr(cuda_ipc.ipc(), "name", None), cuda_ipc.unavailable())
PY
status=0
# each step bounded on its own; the most telling first (a later step's timeout loses nothing
# an earlier one found). pytest: -rfE lists every failure with its error at the end.
step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, show the tail
    local name=$1 secs=$2; shift 2
    echo "=== $name (at most ${secs} s)"
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1 || { echo "  $name: exit $?"; status=1; }
    tail -25 "$OUT/$name.log"
}
PYTEST="python3 -m pytest -q -p no:cacheprovider -rfE"
step kernels 70 $PYTEST tests/gpu/test_cuda_kernels.py
step ipc 170 $PYTEST tests/gpu -k "auto or moe or nccl or copy_engines"
for dt in float bfloat16; do
    step "allreduce_${dt}" 40 python3 bench/all_reduce_perf.py -b 8 -e 64M -f 8 --np 4 \
        --device cuda --vs gloo -d $dt -t 3 --json "$OUT/allreduce_cuda_np4_${dt}.json"
done
step moe 40 python3 bench/moe_perf.py --np 4 --device cuda --config 4096:4096:8:64 \
    -d bfloat16 -t 2 -n 2 --json "$OUT/moe_cuda_np4.json"
step staged 70 $PYTEST tests/gpu/test_collectives_cuda.py -k staged
step unit 30 $PYTEST tests/unit/test_device_staged.py tests/unit/test_device_ipc.py \
    tests/unit/test_device_kernels.py tests/unit/test_memory_seam.py
exit $status
