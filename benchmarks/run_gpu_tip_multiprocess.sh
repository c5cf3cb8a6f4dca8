#!/usr/bin/env bash
# TIPTrainer on 2 GPUs (nccl): one process vs DDP vs FSDP2, same data; loss, gradient, updated weights and peak
# memory per GPU. Needs 2 GPUs and TRL (+ datasets, dill, multiprocess) importable: wheels under .whl/ are installed
# to /tmp/site when `import trl` fails. Logs, dumps and compare.json under $OUT (default benchmarks/out).
# Usage: bash benchmarks/run_gpu_tip_multiprocess.sh [tiny|qwen3-0.6b/1.7b|toy-151k]   (default tiny)
#   tiny: the tests' pair (equality check, memory numbers are small); qwen3-0.6b/1.7b: random weights with the
#   real Qwen3 shapes and vocabulary 151936 (the memory numbers worth recording; building them takes a few minutes).
set -o pipefail
cd "$(dirname "$0")/.."
SHAPES="${1:-tiny}"
OUT="${OUT:-benchmarks/out}"
DUMPS="$OUT/tip_mp_${SHAPES//\//_}"
mkdir -p "$DUMPS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c "import trl, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "trl/datasets missing and no wheels under .whl/"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
CHECK="benchmarks/tip_multiprocess_check.py --device cuda --shapes $SHAPES --cache /tmp/tip_mp_models --out $DUMPS"
LAUNCH="python3 -m accelerate.commands.launch --num_processes 2 --num_machines 1 --mixed_precision no"
LAUNCH="$LAUNCH --dynamo_backend no --main_process_port 0"
FSDP="--use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP"
FSDP="$FSDP --fsdp_transformer_layer_cls_to_wrap Qwen3DecoderLayer --fsdp_reshard_after_forward true"
FSDP="$FSDP --fsdp_cpu_ram_efficient_loading true --fsdp_sync_module_states true"
# The first run builds the models (one process); the launches then load them.
CUDA_VISIBLE_DEVICES=0 python3 $CHECK --runs 4x1,2x2 2>&1 | tee "$OUT/tip_mp_single.log" || exit 1
$LAUNCH --multi_gpu $CHECK --runs 2x1,1x2 2>&1 | tee "$OUT/tip_mp_ddp.log" || exit 1
RUNS="2x1,1x2,2x1:head_sharded,2x1:local_normaliser,2x1:unsynced_teacher,2x1:replicated_head_grad"
$LAUNCH $FSDP $CHECK --runs "$RUNS" 2>&1 | tee "$OUT/tip_mp_fsdp2.log" || exit 1
# One JSON line per run against 1proc_4x1. Expected: loss_rel_diff ~1e-6 and grad_rel_norm_diff ~1e-4 or below for
# every run but the three variants that must differ (local_normaliser ~2x the loss; unsynced_teacher another loss;
# replicated_head_grad the same loss, another gradient).
python3 benchmarks/tip_multiprocess_check.py --compare --out "$DUMPS" | tee "$OUT/tip_mp_compare.jsonl"
