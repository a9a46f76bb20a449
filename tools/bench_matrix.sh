#!/usr/bin/env bash
# Issue 10's benchmark matrix on one GPU: one tools/bench.py run per row, each writing
# OUT/NAME.json and OUT/NAME.log (and OUT/profile_NAME/ where the row profiles), the
# official-style baseline in the same run where it fits in memory. No row starts when less
# than a minute of BUDGET_S (seconds, for the whole matrix) is left, and a row is cut at what
# is left; a row's files from an earlier call are removed first, so a cut or failed row leaves
# no older figures. EXTRA: key=value overrides for every row. ONLY: a regular expression; only
# the rows whose names match run (the ZeRO 3 tuning rows at the end run with
# ONLY="torch_linear|prefetch|overlap" in a call of their own); one that is not valid, or that
# matches no row, stops the call with an error.
#
#   OUT=/tmp/bench BUDGET_S=420 bash tools/bench_matrix.sh
set -u
OUT=${OUT:-runs/bench_matrix}
BUDGET_S=${BUDGET_S:-420}
EXTRA=${EXTRA:-}
if [ -n "${ONLY:-}" ]; then
    [[ "" =~ $ONLY ]]
    if [ $? -eq 2 ]; then
        echo "ONLY=$ONLY is not a valid regular expression" >&2
        exit 2
    fi
fi
mkdir -p "$OUT"
start=$(date +%s)
names=()  # every row's name
matched=0  # rows that ONLY let through

variant() {  # NAME BASE SECTION.KEY=JSON...: OUT/ds_NAME.json, ds_configs/BASE with those keys set
    local name=$1 base=$2
    shift 2
    python - "ds_configs/$base" "$OUT/ds_$name.json" "$@" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
for item in sys.argv[3:]:
    key, value = item.split("=", 1)
    section, key = key.split(".")
    config.setdefault(section, {})[key] = json.loads(value)
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
}

row() {  # NAME DS_CONFIG ARGS... (DS_CONFIG: a file of ds_configs/, or a path)
    local name=$1 ds=$2 left
    shift 2
    names+=("$name")
    if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then
        return
    fi
    matched=$((matched + 1))
    rm -rf "$OUT/$name.json" "$OUT/$name.log" "$OUT/profile_$name"
    left=$((BUDGET_S - ($(date +%s) - start)))
    if [ "$left" -lt 60 ]; then
        echo "$name: not started ($left s of the budget left)"
        return
    fi
    # shellcheck disable=SC2086  # EXTRA holds several key=value words
    [ -f "$ds" ] || ds="ds_configs/$ds"
    timeout "$left" python tools/bench.py --deepspeed_config "$ds" \
        --json "$OUT/$name.json" "$@" $EXTRA > "$OUT/$name.log" 2>&1
    echo "$name: exit $?"
    grep -A4 "^| step " "$OUT/$name.log"
    grep "^per step: " "$OUT/$name.log"  # with --profile: device busy and idle, the host's waits
}

# In the order of what issue 10's goals need, so that a short budget cuts the least needed.
# ViT-L/16 grafting step, batch 128: ZeRO 2 eager against the official style, then with the
# recipe's compiled blocks (the goal's row). Without activation checkpointing, which the
# recipe turns on: at 128 images ViT-L fits without it (47.9 GB peak measured on one H100),
# and each image then needs 20% fewer FLOPs.
row vit_l_graft_zero2 zero2_bf16.json --config vit_l_graft batch_size=128 grad_ckpt=false \
    compile_blocks=false --steps 10 --warmup 3 --profile "$OUT/profile_vit_l_graft_zero2"
row vit_l_graft_zero2_compiled zero2_bf16.json --config vit_l_graft batch_size=128 \
    grad_ckpt=false --steps 10 --warmup 5 --no_reference \
    --profile "$OUT/profile_vit_l_graft_zero2_compiled"
# MAE step i, ViT-L/16, batch 256, without checkpointing (the encoder sees a quarter of the
# patches: about 18 GB of activations on paper): eager against the official style, with
# compiled blocks (the plain-PyTorch anchors gain 1.28x from torch.compile here), and eager with
# DeepSpeed's own gradient checks (per-tensor overflow check and norm, then a wait), which the
# shipped ZeRO 1/2 configs turn off for lgp_ds's single fused check
row vit_l_mae zero2_bf16.json --config vit_l_mae batch_size=256 grad_ckpt=false --steps 10 \
    --warmup 3 --profile "$OUT/profile_vit_l_mae"
row vit_l_mae_compiled zero2_bf16.json --config vit_l_mae batch_size=256 grad_ckpt=false \
    compile_blocks=true --steps 10 --warmup 5 --no_reference
variant zero2_deepspeed_checks zero2_bf16.json bf16.check_grad_overflow=true \
    zero_optimization.compute_grad_norm=true
row vit_l_mae_deepspeed_checks "$OUT/ds_zero2_deepspeed_checks.json" --config vit_l_mae \
    batch_size=256 grad_ckpt=false --steps 10 --warmup 3 --no_reference
# ZeRO 3 on one GPU, eager, then with the recipe's compiled blocks and torch's own F.linear
# (DeepSpeed's default memory-efficient one is an autograd.Function that breaks each compiled
# block's graph at every Linear; torch's keeps the gathered weights of blocks that are not
# checkpointed until backward)
row vit_l_graft_zero3 zero3_bf16.json --config vit_l_graft batch_size=128 grad_ckpt=false \
    compile_blocks=false --steps 10 --warmup 3 --profile "$OUT/profile_vit_l_graft_zero3"
variant zero3_torch_linear zero3_bf16.json zero_optimization.memory_efficient_linear=false
row vit_l_graft_zero3_compiled "$OUT/ds_zero3_torch_linear.json" --config vit_l_graft \
    batch_size=128 grad_ckpt=false --steps 10 --warmup 5 --no_reference
# The fused optimizer that measures faster: DeepSpeed's FusedAdam against torch's fused AdamW
# (the compiled row's), with the recipe's compiled blocks (its JIT build takes a minute unless
# built)
row vit_l_graft_zero2_fused_adam zero2_bf16.json --config vit_l_graft batch_size=128 \
    grad_ckpt=false optimizer=fused_adam --steps 10 --warmup 5 --no_reference
# ViT-g/14 grafting step, micro-batch 32 under ZeRO 3 with the recipe's activation checkpointing
row vit_g_graft_zero3 zero3_bf16.json --config vit_g_graft batch_size=32 --steps 5 --warmup 2 \
    --no_reference
# ZeRO 3 tuning, eager: torch's F.linear alone (a fused bias epilogue, no autograd.Function per
# Linear); the shipped prefetch bucket (5e7 elements, about 4 of ViT-L's blocks) against 2e8
# and against none; overlap_comm off (one GPU has nothing to overlap)
variant zero3_prefetch_2e8 zero3_bf16.json zero_optimization.stage3_prefetch_bucket_size=200000000
variant zero3_prefetch_0 zero3_bf16.json zero_optimization.stage3_prefetch_bucket_size=0
variant zero3_no_overlap zero3_bf16.json zero_optimization.overlap_comm=false
for tuned in zero3_torch_linear zero3_prefetch_2e8 zero3_prefetch_0 zero3_no_overlap; do
    row "vit_l_graft_$tuned" "$OUT/ds_$tuned.json" --config vit_l_graft batch_size=128 \
        grad_ckpt=false compile_blocks=false --steps 10 --warmup 3 --no_reference
done
if [ "$matched" -eq 0 ]; then
    echo "ONLY=$ONLY matches no row; the rows: ${names[*]}" >&2
    exit 2
fi
