#!/usr/bin/env bash
# One call on a lent GPU machine: install m2f over the image's torch / triton (no downloads), then run the
# stages named on the command line, each under its own time limit, logs and results under $OUT.
#
#   bash bench/gpu_session.sh tests kernels model
#
# Stages: env (versions, nvidia-smi), tests (kernel and model tests on the GPU, real sizes included),
# suite (the whole test suite, GPU present), kernels (m2f bench kernels), model (m2f bench model),
# profile (torch.profiler of one model forward). Extra arguments for a stage come from M2F_<STAGE>_ARGS.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
FINAL=$OUT
OUT=$(mktemp -d)  # work here; everything is packed into $FINAL/session.tgz at the end (few files come back)
mkdir -p "$OUT/results"
trap 'tar czf "$FINAL/session.tgz" -C "$OUT" . && echo "packed $FINAL/session.tgz"' EXIT
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }

stage_env() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch, triton, onnxruntime, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'ort', onnxruntime.__version__, onnxruntime.get_available_providers(), 'transformers', transformers.__version__)"
}

stage_tests() {
    timeout ${M2F_TESTS_TIMEOUT:-420} $PY -m pytest -q -n ${M2F_TESTS_WORKERS:-6} -s --timeout=400 \
        -p no:cacheprovider ${M2F_TESTS_ARGS:-tests/test_gpu_real_sizes.py tests/test_ms_deform_attn.py \
        tests/test_masked_attention.py tests/test_msda_model.py tests/test_maskattn_model.py \
        tests/test_maskattn_lowres.py tests/test_msda_aot.py tests/test_maskattn_aot.py tests/test_postprocess.py} \
        2>&1 | tee "$OUT/tests.log" | grep -E "rel err|passed|failed|error|Error|FAILED|SKIPPED" | tail -80
}

stage_suite() {
    timeout ${M2F_SUITE_TIMEOUT:-420} $PY -m pytest -q -n ${M2F_SUITE_WORKERS:-12} --timeout=400 -p no:cacheprovider \
        ${M2F_SUITE_ARGS:-tests} 2>&1 | tee "$OUT/suite.log" | tail -40
}

stage_kernels() {
    timeout ${M2F_KERNELS_TIMEOUT:-300} $PY -m m2f bench kernels --out "$OUT/results" ${M2F_KERNELS_ARGS:-} \
        2>&1 | tee "$OUT/kernels.log" | tail -60
}

stage_model() {
    timeout ${M2F_MODEL_TIMEOUT:-540} $PY -m m2f bench model --out "$OUT/results" ${M2F_MODEL_ARGS:-} \
        2>&1 | tee "$OUT/model.log" | tail -80
}

stage_profile() {
    timeout ${M2F_PROFILE_TIMEOUT:-240} $PY -m m2f.bench.profile_model --out "$OUT" ${M2F_PROFILE_ARGS:-} \
        2>&1 | tee "$OUT/profile.log" | tail -80
}

for stage in "$@"; do
    echo "=== $stage ($(date +%T))"
    "stage_$stage"
done
echo "=== done ($(date +%T))"
