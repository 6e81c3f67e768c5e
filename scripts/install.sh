#!/usr/bin/env bash
# Create .venv and install the deo package into it. `--test` adds the test tools.
# Set PIP_CONSTRAINT to pin torch/torchvision to the build your machine needs (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cluster"
[[ "${1:-}" == "--test" ]] && extras="cluster,test"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
.venv/bin/python -c "import deo, torch, torchvision, timm, zarr, rasterio; print('deo', deo.__version__, 'torch', torch.__version__)"
# `snakemake --profile slurm` from the repository root: link workflow/profiles/slurm where
# Snakemake looks bare profile names up (~/.config/snakemake). A profile of your own is kept.
.venv/bin/deo install-profile ||
  echo "install.sh: kept your own Slurm profile; 'deo install-profile --force' replaces it" >&2
