#!/usr/bin/env bash
# The GPU figures of docs/speed.md in one go, on one CUDA GPU (about 8 minutes on an H200):
# the Lightning path against a bare loop for 124m compiled and not, the tests that need CUDA,
# and the largest compiled micro-batch within an RTX 4070's 11 GiB for 40m and 124m.
# Each part has its own time limit, so one that hangs does not take the others with it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1

python -c "import torch, lightning; print('gpu', torch.cuda.get_device_name(), '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| lightning', lightning.__version__)"
echo "== 124m, bf16, compiled: the Lightning path against the bare loop"
timeout 300 python benchmarks/train_throughput.py --model 124m --compile --micro-batch 64 --accumulation 2 \
    --steps 30 --warmup 10 --rounds 2 ${PROFILE:+--profile}
echo "== 124m, bf16, not compiled"
timeout 150 python benchmarks/train_throughput.py --model 124m --micro-batch 32 --accumulation 4 \
    --steps 20 --warmup 5 --rounds 2
echo "== the tests that need CUDA"
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_speed_and_variants.py -k never_waits
echo "== compiled micro-batches within 11 GiB (powers of two: they divide 512 sequences a step)"
timeout 200 python benchmarks/max_micro_batch.py --compile --model 124m --candidates 16,32
timeout 200 python benchmarks/max_micro_batch.py --compile --model 40m --candidates 16,32,64
