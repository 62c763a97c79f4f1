#!/usr/bin/env bash
# One command for the first GPU run: pretrain (bf16, channels_last, torch.compile), probe and heat
# maps of the resnet50 and vit_small recipes on one GPU; prints images/s and peak GPU memory and
# exits non-zero if anything fails. Details and options: python scripts/gpu_smoke.py --help
#
#   scripts/gpu_smoke.sh                          # Imagenette at 224 px (../shared/data/imagenette-224)
#   scripts/gpu_smoke.sh --data synthetic         # no dataset needed
#   scripts/gpu_smoke.sh --device cpu --steps 4 --warmup 1 --batch 4 --workers 0   # plumbing, no GPU
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" scripts/gpu_smoke.py "$@"
