#!/usr/bin/env bash
# Validate fastprompt on a lent GPU in one command that fits its time (about 9 minutes by
# default): every step under its own timeout, rows written as they are measured, a summary table
# at the end. See benchmarks/gpu_validate.py for the steps.
#
#   benchmarks/gpu_validate.sh [OUTDIR] [--budget SECONDS] [--steps env op ...]
#   benchmarks/gpu_validate.sh /tmp/v --dry-run     # the same steps on the CPU, tiny shapes
set -uo pipefail
cd "$(dirname "$0")/.."
out=()
if [[ $# -gt 0 && "$1" != --* ]]; then
    out=(--out "$1")
    shift
fi
exec python benchmarks/gpu_validate.py "${out[@]}" "$@"
