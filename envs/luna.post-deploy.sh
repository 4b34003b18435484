#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) in the new environment, after it is created from luna.yaml: installs the
# luna package from the repository whose Snakefile runs (workflow/rules/common.smk exports LUNA_REPO; the
# environment's dependencies are all in luna.yaml, so pip adds only luna).
set -euo pipefail
python -m pip install --no-deps -e "${LUNA_REPO:?LUNA_REPO is set by the workflow (common.smk)}"
