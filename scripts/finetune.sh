#!/usr/bin/env bash
# Full fine-tuning of a backbone on every visible GPU (DDP, bf16-mixed, channels_last), or on the CPU.
#
#   scripts/finetune.sh SOURCE [-c CONFIG] [key=value ...] [--resume] [--dry-run]
#   scripts/finetune.sh runs/imagenet_resnet50/checkpoints/last.ckpt data.root=/data/imagenet
#   GPUS=4 BATCH=128 scripts/finetune.sh resnet50 -c imagenet_resnet50 data.label_fraction=0.1
#
# SOURCE: a pretraining .ckpt, an exported .safetensors backbone, a local-dir:/hf-hub: timm folder,
# or a timm name (random init). The recipe is the config's finetune section (its family defaults).
# Variables (GPUS, NODES, BATCH, ACCUM, WORKERS, PRECISION, COMPILE): scripts/launch_common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

if [[ ${#ARGS[@]} -lt 1 || "${ARGS[0]}" == -* ]]; then
    echo "usage: scripts/finetune.sh SOURCE [-c CONFIG] [key=value ...] [--resume] [--dry-run]" >&2
    exit 2
fi
OVERRIDES=("${DEVICE_ARGS[@]}" "data.num_workers=$WORKERS" "trainer.accumulate_grad_batches=$ACCUM")
if [[ -n "${BATCH:-}" ]]; then OVERRIDES+=("data.batch_size=$BATCH"); fi
if [[ "$COMPILE" == 1 ]]; then OVERRIDES+=(trainer.compile=true); fi
CMD=("$HEATSSL" finetune "${ARGS[0]}" "${OVERRIDES[@]}" "${ARGS[@]:1}")
if [[ "$DRY_RUN" == 1 ]]; then
    echo "# GPUS=$GPUS NODES=$NODES BATCH=${BATCH:-config} ACCUM=$ACCUM WORKERS=$WORKERS PRECISION=$PRECISION"
    launch "${CMD[@]}"
    plain=()
    for a in "${CMD[@]:1}"; do [[ "$a" == --* ]] || plain+=("$a"); done
    "$HEATSSL" "${plain[@]}" --print-config
    exit 0
fi
launch "${CMD[@]}"
