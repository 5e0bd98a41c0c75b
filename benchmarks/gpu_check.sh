#!/usr/bin/env bash
# The GPU measurements owed since issue 12 (docs/performance.md, "GPU: what is owed"), in one go.
#
#   bash benchmarks/gpu_check.sh --prepare    # HERE, with a package registry: wheels for a bare
#                                             # CUDA machine (Python 3.12) into .whl/ (git-ignored)
#   OUT=gpu-out bash benchmarks/gpu_check.sh  # THERE, in the repository root, on the GPU machine
#   STEPS="cuda_tests svi_step" bash benchmarks/gpu_check.sh   # some steps only
#
# Each step runs under its own time limit (seconds, below) with its whole output in $OUT/<step>.log;
# this script prints each step's exit status, wall time and last lines. The steps in order, with
# what each records (docs/performance.md and docs/nlb.md take the numbers, with the GPU's name):
#
#   gpu             nvidia-smi: the GPU's name, memory, driver
#   cuda_tests      tests/test_cuda.py (fit, resume with the CUDA RNG, posterior, predictive, NLB export)
#   svi_step        benchmarks/svi_step.py --device cuda: one SVI step at batch 64 and 256, Pyro / plain
#                   PyTorch ratio (above 1.3: profile and fix)
#   posterior_speed benchmarks/posterior_speed.py --device cuda: S = 50 / S = 1 per-draw loop, tiled
#                   trials and the draws plate, at max_tiled 256, 1000, 5000 (target <= 8)
#   lorenz          examples/lorenz.py --device cuda: wall time and R^2 (its last line)
#   full_size       benchmarks/nlb_full_size.py --device cuda: synthetic full-size MC_Maze, seconds per
#                   epoch fitted at 20 and at 5 ms, validation, export (its table)
#   mms_default     the default MC_Maze_Small run at 5 ms on the GPU (wall time; members one after the
#                   other: worker processes are for CPUs)
#   mms_cv5         the same under --cv 5 (25 models: co-bps mean +- s.e. over the folds); the longest
#                   step, in a call of its own
#
# The limits of the first seven steps add up to 550 s, inside the device tool's 600 s for one call;
# mms_cv5 is its own call (the default STEPS leave it out):
#
#   OUT=$OUT bash benchmarks/gpu_check.sh                    # call 1: gpu ... mms_default
#   OUT=$OUT STEPS=mms_cv5 bash benchmarks/gpu_check.sh      # call 2, if device time is left
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    # pyro-langevin's needs that the GPU image lacks (it has torch, numpy, scipy, scikit-learn, h5py,
    # pandas, matplotlib, tqdm, xarray), as Python 3.12 wheels, and the package itself as a wheel.
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pyro-ppl pyro-api opt-einsum torchsde trampoline "arviz<1" xarray-einstats h5netcdf \
        nlb-tools==0.0.4 pynwb hdmf ruamel.yaml ruamel.yaml.clib jsonschema jsonschema-specifications \
        referencing rpds-py || exit 1
    python3 -m pip wheel -q --no-deps -w .whl . || exit 1
    du -sh .whl && ls .whl
    echo "carry .whl in the device call (it counts towards the 64 MiB of the working tree)"
    exit 0
fi

OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MPLBACKEND=Agg
if [[ -d .whl ]]; then  # a bare GPU machine: the carried wheels, this package among them
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
STEPS=${STEPS:-"gpu cuda_tests svi_step posterior_speed lorenz full_size mms_default"}
DATA=tests/data

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s$([[ $rc == 124 ]] && echo ' (time limit)')"
    tail -n 12 "$OUT/$name.log"
}

step gpu 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step cuda_tests 60 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
step svi_step 60 $PY benchmarks/svi_step.py --device cuda --repeats 5
step posterior_speed 60 $PY benchmarks/posterior_speed.py --device cuda --max-tiled 256 1000 5000 --repeats 3
step lorenz 90 $PY examples/lorenz.py --device cuda --out "$OUT/lorenz" --overwrite --no-progress
step full_size 120 $PY benchmarks/nlb_full_size.py --device cuda --data /tmp/nlb-full --out /tmp/full-size --overwrite \
    --datasets mc_maze --fit-bins 20 5 --epochs 3 --export-draws 10 --json "$OUT/full_size.json"
step mms_default 150 $PY examples/nlb.py --dataset mc_maze_small --data-dir "$DATA" --bin-ms 5 --phase val \
    --device cuda --out /tmp/mms-default --overwrite --no-progress
step mms_cv5 580 $PY examples/nlb.py --dataset mc_maze_small --data-dir "$DATA" --bin-ms 5 --phase val --cv 5 \
    --device cuda --out /tmp/mms-cv5 --overwrite --no-progress
echo "logs in $OUT"
