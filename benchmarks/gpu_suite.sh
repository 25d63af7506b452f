#!/usr/bin/env bash
# Every GPU check of minimlp in one run, for a machine with one CUDA GPU and no package registry:
#
#     bash benchmarks/gpu_suite.sh DIR
#
# It installs nothing: python3 (or $PYTHON) must already hold minimlp's requirements, CuPy (cupy-cuda12x or
# cupy-cuda13x, with NVRTC, cuBLAS and the CUDA headers) and pytest; PyTorch with CUDA and timm for the PyTorch
# rows (without them only those rows fail). The parts run in this order, each under its own time limit, each
# even when an earlier one failed, all of them within 8 minutes (BUDGET seconds, 470 by default):
#
#   preflight   python, CuPy, the GPU, backend.check_gpu_libraries (NVRTC, cuBLAS, a probe kernel, NCCL), torch 30 s
#   gpu-tests   pytest: the GPU test files (fused kernels, kernel compile, training, feed, AMP); junit xml 110 s
#   xp-tests    pytest: the CuPy case of every other test parametrized over the xp fixture; junit xml       80 s
#   gpu-checks  benchmarks/gpu_checks.py: TF32 and AMP errors vs float64, peak memory of S12 at batch 256  110 s
#   train-step  benchmarks/gpu_train_step.py: S12 at batch 256, minimlp against PyTorch                    110 s
#   loader      benchmarks/loader_throughput.py: images/s of the JPEG loader by worker count                30 s
#
# DIR receives <part>.log for each part, gpu-tests.xml, xp-tests.xml, gpu_checks.{json,md}, gpu_train_step.{json,md},
# preflight.json and summary.md: one line per part (ok, FAILED, TIMED OUT or SKIPPED, the seconds it took and
# what it found), then the result tables. Exit status: the number of parts that did not pass.
#
# Where only a few files come back from the machine, pack DIR, for example:
#     bash benchmarks/gpu_suite.sh /tmp/gpu; tar czf "$OUT/gpu.tgz" -C /tmp gpu
# Without a GPU the preflight fails, the GPU tests are only collected (import and selection errors show),
# and each benchmark stops at once with one line: every part still runs and says so. With
# SUITE_DEVICE=cpu the benchmarks run their own code on the CPU at toy sizes instead (a dry run, no numbers).
set -uo pipefail
if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu_suite.sh DIR   (DIR: where every log and result is written)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-470}
SUITE_DEVICE=${SUITE_DEVICE:-gpu}
export PYTHONUNBUFFERED=1 CUPY_DUMP_CUDA_SOURCE_ON_ERROR=1
summary="$out/summary.md"
start=$SECONDS
failed=0
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit" > "$summary"
echo >> "$summary"

# part NAME LIMIT NOTE COMMAND...: run COMMAND under `timeout`, output to the screen and DIR/NAME.log, one
# line in the summary. The limit shrinks to what is left of BUDGET; a part with under 10 s left is skipped.
part() {
    local name=$1 limit=$2 note=$3
    shift 3
    local left=$((BUDGET - (SECONDS - start)))
    if [ "$left" -lt 10 ]; then
        echo "- **$name**: SKIPPED (the suite's ${BUDGET} s are spent)" >> "$summary"
        failed=$((failed + 1))
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit} s): $*" | tee "$out/$name.log"
    local began=$SECONDS
    timeout -s INT -k 10 "$limit" "$@" 2>&1 | tee -a "$out/$name.log"  # SIGINT: pytest still writes its report
    local status=${PIPESTATUS[0]} took=$((SECONDS - began)) verdict
    case $status in
        0) verdict="ok" ;;
        124 | 137) verdict="TIMED OUT after ${limit} s" ;;
        *) verdict="FAILED (exit status $status): $(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c1-300)" ;;
    esac
    [ "$status" -eq 0 ] || failed=$((failed + 1))
    echo "- **$name**: $verdict; ${took} s${note:+; $note}" >> "$summary"
}

# --- preflight: what this machine has, and whether --device gpu starts (one line when it does not) -------
part preflight 30 "" "$PY" - "$out/preflight.json" <<'EOF'
import json, platform, shutil, subprocess, sys
found = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine()}
print(f"python {found['python']} at {sys.executable}")
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    found["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
    print("nvidia-smi:", found["nvidia_smi"])
import numpy
found["numpy"] = numpy.__version__
try:
    import cupy
    found["cupy"] = cupy.__version__
    print("cupy", cupy.__version__)
except ImportError as error:
    found["cupy"] = f"missing: {error}"
for name in ("torch", "timm"):  # only the PyTorch rows and the twin tests need them
    try:
        if name == "torch":
            import torch
            found[name] = f"{torch.__version__}, CUDA {torch.version.cuda}, GPU seen: {torch.cuda.is_available()}"
        else:
            from minimlp.tools.pytorch_references import timm
            found[name] = timm.__version__
    except Exception as error:
        found[name] = f"unusable: {type(error).__name__}: {error}"
print("torch", found["torch"], "| timm", found["timm"])
from minimlp import backend
status = 0
try:
    backend.resolve_device("gpu")  # CuPy, a GPU, then check_gpu_libraries: NVRTC, cuBLAS, a probe kernel
    found["device_gpu"] = "starts"
except backend.DeviceError as error:
    found["device_gpu"] = str(error)
    print(error)
    status = 1
if status == 0:
    try:  # what the README records; a failure here does not stop the GPU parts
        properties = cupy.cuda.runtime.getDeviceProperties(0)
        found.update(gpu=properties["name"].decode(), sm=f"{properties['major']}{properties['minor']}",
                     gpu_memory_gib=round(properties["totalGlobalMem"] / 2 ** 30, 1),
                     cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                     cuda_driver=cupy.cuda.runtime.driverGetVersion(),
                     nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())))
        print(f"GPU: {found['gpu']} (sm_{found['sm']}, {found['gpu_memory_gib']} GiB); CUDA runtime "
              f"{found['cuda_runtime']}, driver {found['cuda_driver']}, NVRTC {found['nvrtc']}: --device gpu starts")
    except Exception as error:
        print(f"--device gpu starts; its properties: {type(error).__name__}: {error}")
    try:  # what data parallel on GPUs needs; tests/test_distributed.py's NCCL tests skip without it
        backend.check_gpu_libraries(nccl=True)
        from cupy.cuda import nccl
        version = nccl.get_version()  # 22105 for 2.21.5
        found["nccl"] = f"{version // 10000}.{version // 100 % 100}.{version % 100}"
        print("NCCL", found["nccl"], "loads: the NCCL tests run")
    except Exception as error:
        found["nccl"] = f"unusable: {error}"
        print(f"NCCL: {found['nccl']} (the NCCL tests will skip)")
with open(sys.argv[1], "w") as file:
    json.dump(found, file, indent=2)
sys.exit(status)
EOF
if grep -q '"device_gpu": "starts"' "$out/preflight.json" 2>/dev/null; then gpu=yes; else gpu=no; fi

# --- the tests on the GPU: first the GPU files whole, then the CuPy case of every other xp-parametrized test -----
gpu_files=(tests/test_kernel_compile.py tests/test_fast_paths.py tests/test_gpu_training.py tests/test_device_feed.py
           tests/test_amp.py)
xp_cases=(tests -k "cupy or gpu" $(printf -- '--ignore=%s ' "${gpu_files[@]}"))
per_test=()
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 90)

junit_counts() {  # the summary's line for a junit xml file
    "$PY" - "$1" >> "$summary" <<'EOF'
import sys, xml.etree.ElementTree as tree
suite = tree.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
print(f"  - {counts['tests']} tests: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
      f"{counts['skipped']} skipped")
EOF
}

pytest_on_gpu() {  # pytest_on_gpu NAME LIMIT PYTEST-ARGUMENTS...
    local name=$1 limit=$2
    shift 2
    if [ "$gpu" = yes ]; then
        part "$name" "$limit" "junit: $name.xml" "$PY" -m pytest -q -rfEs --durations=10 -p no:cacheprovider \
            ${per_test[@]+"${per_test[@]}"} --junitxml="$out/$name.xml" "$@"
        [ -f "$out/$name.xml" ] && junit_counts "$out/$name.xml"
    else
        part "$name" 60 "no GPU: collected only, nothing run" "$PY" -m pytest -q --collect-only -p no:cacheprovider "$@"
    fi
}
pytest_on_gpu gpu-tests 110 "${gpu_files[@]}"
pytest_on_gpu xp-tests 80 "${xp_cases[@]}"

# --- benchmarks -------------------------------------------------------------------------------------------
checks=(--child-timeout 35)
step=(--steps 20 --warmup 3)
loader=(--images 256 --workers 0 4 8 16)
if [ "$SUITE_DEVICE" = cpu ]; then  # a dry run of the benchmarks' own code on the CPU, at toy sizes
    checks=(--device cpu --tolerance-batch 2 --memory-batch 2 --steps 1 --child-timeout 60)
    step=(--device cpu --batch-size 2 --steps 1 --warmup 0 --no-compile)
fi
[ "$gpu" = yes ] || loader=(--images 50 --workers 0 1)  # no GPU: only check that the loader part runs
part gpu-checks 110 "" "$PY" benchmarks/gpu_checks.py --out "$out" "${checks[@]}"
part train-step 110 "" "$PY" benchmarks/gpu_train_step.py --out "$out" "${step[@]}"
part loader 30 "" "$PY" benchmarks/loader_throughput.py "${loader[@]}"

# --- the summary: the result tables after the part lines ----------------------------------------------------
echo "- total: $((SECONDS - start)) s of ${BUDGET} s; $failed part(s) did not pass" >> "$summary"
for table in gpu_checks.md gpu_train_step.md; do
    [ -f "$out/$table" ] && { echo; echo "## $table"; echo; cat "$out/$table"; } >> "$summary"
done
[ -f "$out/loader.log" ] && { echo; echo "## loader_throughput"; echo; grep '^|' "$out/loader.log"; } >> "$summary"
echo
cat "$summary"
exit "$failed"
