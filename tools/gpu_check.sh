#!/usr/bin/env bash
# The whole GPU check on a one-GPU machine, in one call: tests/test_gpu.py, then
# tools/bench_matrix.sh's rows, then (with ANCHORS=) the plain-PyTorch anchors of
# anchor_bench.py (the step lgp_ds is compared with: eager, DeepSpeed ZeRO 2 and 3, compiled),
# each part skipped when less than a minute of BUDGET_S (seconds, for the whole call) is left.
# PARTS (default "tests matrix anchors") names the parts to run, for a second call (e.g.
# PARTS=anchors, or PARTS=matrix ONLY="torch_linear|prefetch|overlap" for bench_matrix.sh's
# tuning rows).
# Results under OUT: test_gpu.log, matrix/ (a JSON and a log per row), matrix.txt, anchors.json,
# anchors.log, nvidia-smi.txt.
#
#   OUT=/tmp/gpu BUDGET_S=560 MATRIX_S=330 [WHEELS=.whl] [ANCHORS=.gpu/anchor_bench.py] \
#       bash tools/gpu_check.sh
#
# WHEELS: a folder of wheels installed (without dependencies) into /tmp/site first, for images
# that lack DeepSpeed, webdataset or fvcore. MATRIX_S: the matrix's share of the budget (the
# rest goes to the anchors). Both paths are relative to the checkout: on a machine that
# receives the checkout alone, send those folders with it. FusedAdam and CPU Adam are JIT-built
# in the background from the start (tests/test_gpu.py and the FusedAdam row need them; about a
# minute); a build that an earlier call left unfinished leaves torch's lock file, which would
# make this one wait forever, so stale locks (that no live process holds open) are removed
# first, and the build is stopped when the script exits. A missing WHEELS folder or a failed
# install stops the call (every part needs those packages); a part skipped for the budget says
# so.
set -u
OUT=${OUT:-runs/gpu_check}
BUDGET_S=${BUDGET_S:-560}
MATRIX_S=${MATRIX_S:-330}
PARTS=${PARTS:-tests matrix anchors}
KNOWN_PARTS="tests matrix anchors"
for name in $PARTS; do
    if [[ " $KNOWN_PARTS " != *" $name "* ]]; then
        echo "PARTS: unknown part '$name' (the parts: $KNOWN_PARTS)" >&2
        exit 2
    fi
done
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }

if [ -n "${WHEELS:-}" ]; then
    if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
        echo "WHEELS=$WHEELS: no such folder, or no .whl in it; skipped: $PARTS" >&2
        exit 2
    fi
    if ! pip install -q --no-deps --target /tmp/site "$WHEELS"/*.whl > "$OUT/wheels.log" 2>&1
    then
        echo "WHEELS: pip install failed ($OUT/wheels.log); skipped: $PARTS" >&2
        tail -5 "$OUT/wheels.log" >&2
        exit 1
    fi
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# the image's "9.0a" breaks DeepSpeed's FusedAdam build
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

held() {  # FILE: whether a live process has it open (torch's FileBaton, while it builds)
    local fd
    for fd in /proc/[0-9]*/fd/*; do
        [ "$(readlink "$fd" 2> /dev/null)" = "$1" ] && return 0
    done
    return 1
}
while IFS= read -r -d '' lock; do
    lock=$(readlink -f "$lock")
    if held "$lock"; then
        echo "torch extension lock $lock: held by a running build, kept"
    else
        rm -f "$lock" && echo "torch extension lock $lock: stale, removed"
    fi
done < <(find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name lock -print0 \
         2> /dev/null)

# in a process group of its own, so that the exit trap stops the compilers it started too
setsid python -c "from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder
FusedAdamBuilder().load(); CPUAdamBuilder().load()" > "$OUT/ops_build.log" 2>&1 &
builder=$!
trap 'kill -0 "$builder" 2> /dev/null && kill -- -"$builder" 2> /dev/null' EXIT
while kill -0 "$builder" 2> /dev/null && [ "$(left)" -ge 60 ]; do
    sleep 2
done
if kill -0 "$builder" 2> /dev/null; then
    echo "FusedAdam and CPU Adam build: still running after $(( $(date +%s) - start )) s," \
        "the budget spent ($OUT/ops_build.log)"
else
    wait "$builder"
    echo "FusedAdam and CPU Adam build: exit $? after $(( $(date +%s) - start )) s"
fi

part() {  # NAME: whether to run the part; says why not where PARTS names it
    [[ " $PARTS " == *" $1 "* ]] || return 1
    if [ "$(left)" -lt 60 ]; then
        echo "$1: skipped ($(left) s of the budget left)"
        return 1
    fi
}

if part tests; then
    timeout "$(left)" python -m pytest -q -rs tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1
    echo "tests/test_gpu.py: exit $? ($(tail -1 "$OUT/test_gpu.log"))"
fi

if part matrix; then
    matrix=$(( $(left) < MATRIX_S ? $(left) : MATRIX_S ))
    OUT="$OUT/matrix" BUDGET_S=$matrix bash tools/bench_matrix.sh | tee "$OUT/matrix.txt"
fi

anchors=0
part anchors && anchors=1
if [ "$anchors" = 1 ] && [ -z "${ANCHORS:-}" ]; then
    echo "anchors: skipped (no ANCHORS= script)"
elif [ "$anchors" = 1 ]; then
    timeout "$(left)" python - "$ANCHORS" "$OUT" "$(left)" > "$OUT/anchors.log" 2>&1 <<'PY'
import importlib.util, json, sys, time
import torch
spec = importlib.util.spec_from_file_location("anchor_bench", sys.argv[1])
a = importlib.util.module_from_spec(spec)
spec.loader.exec_module(a)
deadline = time.time() + float(sys.argv[3])
torch.backends.cuda.matmul.allow_tf32 = True
peak = a.matmul_peak()
print("bf16 matmul peak TFLOP/s", round(peak, 1), torch.cuda.get_device_name(), flush=True)
L = "vit_large_patch16_224"
plan = [("plain PyTorch eager bf16 bs128", L, 128, {}),
        ("plain DeepSpeed ZeRO 2 bs128", L, 128, dict(ds=True)),
        ("plain DeepSpeed ZeRO 3 bs128", L, 128, dict(ds=True, zero=3, steps=5)),
        ("plain PyTorch torch.compile bs128", L, 128, dict(compile_=True))]
for name, arch, batch, options in plan:
    if time.time() > deadline - 60:
        print("skipped (time)", name, flush=True)
        continue
    a.safe(name, arch, batch, torch.bfloat16, True, **options)
    for r in a.results:  # written after each run: a run cut by the budget loses itself only
        if "error" not in r:
            r["mfu_percent"] = round(100 * r["tflops"] / peak, 1)
    json.dump({"peak_tflops": peak, "results": a.results},
              open(f"{sys.argv[2]}/anchors.json", "w"), indent=1)
PY
    echo "anchors: exit $?"
    grep -h '^{' "$OUT/anchors.log"
fi
echo "gpu_check: $(( $(date +%s) - start )) s"
