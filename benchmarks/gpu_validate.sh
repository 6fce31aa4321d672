#!/usr/bin/env bash
# One command for the day a GPU is lent: the gpu tests, the op benchmark and the model benchmark,
# every result written with device and versions under benchmarks/results/<device>/.
#
#   benchmarks/gpu_validate.sh            # everything: env, tests, op, model
#   benchmarks/gpu_validate.sh tests      # or one step: env | tests | op | model
#
# Not measured yet (no GPU has been lent): expect minutes per step, most of it Triton compiling
# (autotuning compiles each listed config once per head dim and dtype; the Triton cache keeps
# them for later steps). Where one call is capped at 10 minutes, run the steps one by one.
# Works on older stacks too (checked for torch 2.11 / triton 3.6): FLOP counting needs fvcore and
# is skipped with --no-flops when it is missing. Steps run in order; the script goes on after a
# failing step and exits non-zero at the end if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, not another install
unset TRITON_INTERPRET

step="${1:-all}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_validate: no CUDA device visible to torch" >&2
    exit 1
}
device="$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")"
out="benchmarks/results/${device}"
mkdir -p "$out"
failed=()
# the CLI through this checkout (a `fastprompt` console script may belong to another install)
cli=(python -c "import sys; from fastprompt.cli import main; sys.exit(main(sys.argv[1:]))")

run() {  # run NAME CMD...: log to $out/NAME.log, remember failures
    local name="$1"
    shift
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$out/$name.log"; then
        failed+=("$name")
    fi
}

if [[ "$step" == all || "$step" == env ]]; then
    "${cli[@]}" info > "$out/fastprompt_info.txt" 2>&1 || true
    python - > "$out/environment.json" <<'EOF'
import json, torch
from fastprompt.bench import environment
env = environment(torch.device("cuda"))
env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
env["device_count"] = torch.cuda.device_count()
print(json.dumps(env, indent=2))
EOF
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
    cat "$out/environment.json"
fi

if [[ "$step" == all || "$step" == tests ]]; then
    run pytest_gpu python -m pytest -m gpu -q -rs -p no:cacheprovider \
        --junitxml="$out/pytest_gpu.xml" tests
fi

if [[ "$step" == all || "$step" == op ]]; then
    run op_bench python benchmarks/bench_prompt_attention_gpu.py --dtype bfloat16 --out "$out/op"
fi

if [[ "$step" == all || "$step" == model ]]; then
    flops=()
    python -c "import fvcore" 2>/dev/null || flops=(--no-flops)
    run model_bench_bf16 "${cli[@]}" bench --device cuda --dtype bfloat16 --prompts 50 100 200 \
        "${flops[@]}" --out "$out/vit_b16_deep_bf16"
fi

if (( ${#failed[@]} )); then
    echo "gpu_validate: failed steps: ${failed[*]} (logs in $out)" >&2
    exit 1
fi
echo "gpu_validate: done; results in $out"
