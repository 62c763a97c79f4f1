#!/usr/bin/env bash
# CAM / gradient-CAM heat maps of a probed backbone, on the first visible GPU or on the CPU.
#
#   scripts/heatmaps.sh SOURCE --head HEAD [--method cam gradcam] [--images DIR] [key=value ...] [--dry-run]
#   scripts/heatmaps.sh runs/x/checkpoints/last.ckpt --head runs/x/probe/linear_head.safetensors
#
# Variables: scripts/launch_common.sh (WORKERS for the data split's loader).
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

if [[ ${#ARGS[@]} -lt 1 || "${ARGS[0]}" == -* ]]; then
    echo "usage: scripts/heatmaps.sh SOURCE --head HEAD [options] [key=value ...] [--dry-run]" >&2
    exit 2
fi
if [[ "$GPUS" -gt 0 && -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then export CUDA_VISIBLE_DEVICES=0; fi
CMD=("$HEATSSL" heatmaps "${ARGS[0]}" "data.num_workers=$WORKERS" "${ARGS[@]:1}")
if [[ "$DRY_RUN" == 1 ]]; then
    echo "# GPUS=$GPUS (heat maps use one: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none})" \
         "WORKERS=$WORKERS"
    launch "${CMD[@]}"
    exit 0
fi
launch "${CMD[@]}"
