#!/usr/bin/env bash
# Linear / tran-1 / kNN probes of a frozen backbone, on the first visible GPU (bf16 feature
# extraction) or on the CPU. Features are extracted once; the heads then train on the cache, so one
# device is enough: more would only split a pass that is already short.
#
#   scripts/linear_eval.sh SOURCE [-c CONFIG] [key=value ...] [--dry-run]
#   BATCH=512 scripts/linear_eval.sh runs/imagenet_resnet50/checkpoints/last.ckpt
#
# SOURCE: a pretraining .ckpt, an exported .safetensors backbone, or a timm name (random init).
# BATCH sets probe.batch_size; WORKERS the loader workers. Variables: scripts/launch_common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

if [[ ${#ARGS[@]} -lt 1 || "${ARGS[0]}" == -* ]]; then
    echo "usage: scripts/linear_eval.sh SOURCE [-c CONFIG] [key=value ...] [--dry-run]" >&2
    exit 2
fi
if [[ "$GPUS" -gt 0 && -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then export CUDA_VISIBLE_DEVICES=0; fi
OVERRIDES=("data.num_workers=$WORKERS")
if [[ -n "${BATCH:-}" ]]; then OVERRIDES+=("probe.batch_size=$BATCH"); fi
CMD=("$HEATSSL" probe "${ARGS[0]}" "${OVERRIDES[@]}" "${ARGS[@]:1}")
if [[ "$DRY_RUN" == 1 ]]; then
    echo "# GPUS=$GPUS (probe uses one: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none})" \
         "BATCH=${BATCH:-config} WORKERS=$WORKERS"
    launch "${CMD[@]}"
    "${CMD[@]}" --print-config
    exit 0
fi
launch "${CMD[@]}"
