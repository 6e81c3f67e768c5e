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
.venv/bin/python -c "import deo, torch, torchvision, timm, zarr, rasterio, pygments; print('deo', deo.__version__, 'torch', torch.__version__)"
# `snakemake --profile slurm` from the repository root: link workflow/profiles/slurm where
# Snakemake looks bare profile names up (~/.config/snakemake). A profile of your own is kept.
.venv/bin/deo install-profile ||
  echo "install.sh: kept your own Slurm profile; 'deo install-profile --force' replaces it" >&2
# Graphviz's `dot` draws the README's DAG picture as SVG. Not a Python package: installed with
# apt where it exists and we may (root); elsewhere `snakemake --dag mermaid-js` needs nothing.
if ! command -v dot >/dev/null; then
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    { apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends graphviz \
        >/dev/null; } ||
      echo "install.sh: could not install Graphviz; use 'snakemake --dag mermaid-js'" >&2
  else
    echo "install.sh: no Graphviz 'dot' (install it for the SVG DAG picture, or use" \
      "'snakemake --dag mermaid-js')" >&2
  fi
fi
