# Shared by pretrain.sh, linear_eval.sh and heatmaps.sh: hardware detection and launch settings.
# Sourced, not run. Every setting can be overridden by an environment variable:
#   GPUS      GPUs per node to use (default: all visible; 0 runs on the CPU)
#   NODES     nodes (default: SLURM_NNODES, else 1)
#   BATCH     per-device batch size (default: the config's data.batch_size)
#   ACCUM     gradient accumulation steps (default 1)
#   WORKERS   data-loader workers (DALI: threads) per process (default: auto = the CPU cores of each
#             process: its own under srun --cpus-per-task, else the node's cores / GPUs)
#   PRECISION Lightning precision (default bf16-mixed on GPU, 32-true on CPU)
#   COMPILE   1: torch.compile the backbone and decoder (default 0)
#   HEATSSL   the heatssl command (default: heatssl on PATH)

set -euo pipefail

HEATSSL=${HEATSSL:-heatssl}
DRY_RUN=0
ARGS=()
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done

detect_gpus() {
    if [[ -n "${GPUS:-}" ]]; then echo "$GPUS"; return; fi
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        local n
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
            n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
        fi
        echo "${n:-0}"; return
    fi
    python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

GPUS=$(detect_gpus)
NODES=${NODES:-${SLURM_NNODES:-1}}
ACCUM=${ACCUM:-1}
COMPILE=${COMPILE:-0}
# Whole numbers only (checked before any arithmetic uses them).
whole() {
    local name=$1 value=$2 min=$3
    if ! [[ "$value" =~ ^[0-9]+$ ]] || (( value < min )); then
        echo "$(basename "$0"): $name=$value must be a whole number >= $min" >&2
        exit 2
    fi
}
whole GPUS "$GPUS" 0
whole NODES "$NODES" 1
whole ACCUM "$ACCUM" 1
WORKERS=${WORKERS:-auto}
if [[ "$WORKERS" != auto ]]; then whole WORKERS "$WORKERS" 0; fi
if [[ -n "${BATCH:-}" ]]; then whole "BATCH (per-device batch)" "$BATCH" 1; fi
if [[ "$GPUS" -gt 0 ]]; then
    PRECISION=${PRECISION:-bf16-mixed}
    DEVICE_ARGS=(trainer.accelerator=gpu "trainer.devices=$GPUS" "trainer.num_nodes=$NODES"
                 "trainer.precision=$PRECISION" trainer.channels_last=true)
    if (( GPUS * NODES > 1 )); then
        DEVICE_ARGS+=(trainer.strategy=ddp)
    else
        DEVICE_ARGS+=(trainer.strategy=auto)
    fi
else
    PRECISION=${PRECISION:-32-true}
    DEVICE_ARGS=(trainer.accelerator=cpu trainer.devices=1 "trainer.num_nodes=$NODES"
                 "trainer.precision=$PRECISION" trainer.strategy=auto)
fi

# Print a command (shell-quoted) and run it, or only print it with --dry-run.
launch() {
    echo "+ $(printf '%q ' "$@")"
    if [[ "$DRY_RUN" == 1 ]]; then return 0; fi
    exec "$@"
}
