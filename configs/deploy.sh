#!/usr/bin/env bash
# Compress the quickstart model for CPU serving (run `make quickstart` first): int8, 2:4 pruning, a recovery
# fine-tune that keeps the zeros, and a look at each result. Every report puts the original beside the result.
set -euo pipefail
cd "$(dirname "$0")/.."
sf() { .venv/bin/python -m launcher.cli "$@"; }
sf quantize --checkpoint runs/quickstart/checkpoints --out runs/quickstart/int8 --mode dynamic --overwrite
sf generate --checkpoint runs/quickstart/int8 --prompt "def main(argv):" --temperature 0 --max-new-tokens 32
sf prune --checkpoint runs/quickstart/checkpoints --out runs/quickstart/pruned-2of4 --nm 2:4 --overwrite
sf finetune -c configs/recover.yaml
sf eval --checkpoint runs/recover/checkpoints --max-samples 512
sf export hf --checkpoint runs/recover/checkpoints --out runs/recover/hf --overwrite
