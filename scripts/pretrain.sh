#!/usr/bin/env bash
# QB-Heat pretraining on every visible GPU (DDP, bf16-mixed, channels_last), or on the CPU.
#
#   scripts/pretrain.sh CONFIG [key=value ...] [--resume] [--dry-run]
#   GPUS=4 BATCH=128 scripts/pretrain.sh configs/imagenet_resnet50.yaml data.root=/data/imagenet
#   NODES=2 MASTER_ADDR=node0 NODE_RANK=0 scripts/pretrain.sh ...   (torchrun on each node, no SLURM)
#   sbatch scripts/slurm_pretrain.sbatch CONFIG ...                  (SLURM: see that file)
#
# Variables: see scripts/launch_common.sh. --dry-run prints the command and the resolved config
# (with the effective batch and the lr that follows it) and runs nothing.
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"

if [[ ${#ARGS[@]} -lt 1 || "${ARGS[0]}" == -* ]]; then
    echo "usage: scripts/pretrain.sh CONFIG [key=value ...] [--resume] [--dry-run]" >&2
    exit 2
fi
CONFIG=${ARGS[0]}
OVERRIDES=("${DEVICE_ARGS[@]}" "data.num_workers=$WORKERS" "trainer.accumulate_grad_batches=$ACCUM")
if [[ -n "${BATCH:-}" ]]; then OVERRIDES+=("data.batch_size=$BATCH"); fi
if [[ "$COMPILE" == 1 ]]; then OVERRIDES+=(trainer.compile=true); fi
OVERRIDES+=("${ARGS[@]:1}")  # the user's own overrides come last and win

if (( NODES > 1 )) && [[ -z "${SLURM_NTASKS:-}" ]]; then
    # Multi-node without SLURM: torchrun on every node; Lightning reads its environment.
    if [[ -z "${MASTER_ADDR:-}" && "$DRY_RUN" == 0 ]]; then
        echo "pretrain.sh: NODES=$NODES needs MASTER_ADDR (the address of node 0) and NODE_RANK" \
             "(0..$((NODES - 1))) on each node, or a SLURM job (scripts/slurm_pretrain.sbatch)." >&2
        exit 2
    fi
    CMD=(torchrun "--nnodes=$NODES" "--nproc_per_node=$(( GPUS > 0 ? GPUS : 1 ))"
         "--node_rank=${NODE_RANK:-0}" "--master_addr=${MASTER_ADDR:-MASTER_ADDR}"
         "--master_port=${MASTER_PORT:-29500}" -m heatssl.cli pretrain -c "$CONFIG" "${OVERRIDES[@]}")
else
    # One node (Lightning starts one process per GPU), or one SLURM task of srun.
    CMD=("$HEATSSL" pretrain -c "$CONFIG" "${OVERRIDES[@]}")
fi

if [[ "$DRY_RUN" == 1 ]]; then
    echo "# GPUS=$GPUS NODES=$NODES BATCH=${BATCH:-config} ACCUM=$ACCUM WORKERS=$WORKERS PRECISION=$PRECISION"
    launch "${CMD[@]}"
    plain=()
    for a in "${OVERRIDES[@]}"; do [[ "$a" == --* ]] || plain+=("$a"); done
    "$HEATSSL" pretrain -c "$CONFIG" "${plain[@]}" --print-config
    exit 0
fi
launch "${CMD[@]}"
