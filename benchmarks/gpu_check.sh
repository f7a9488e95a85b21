#!/usr/bin/env bash
# GPU checks for a lent H100/H200 in one call (issue #21: 15 device minutes in all, a call at most 10).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels    # here, with PyPI: fla-core + transformers -> runs/gpu_wheels (~15 MB)
#   bash benchmarks/gpu_check.sh                   # there: the default stages below, about 6 of the 8 minutes budgeted
#   bash benchmarks/gpu_check.sh STAGE...          # there: named stages only (list: the case below)
#   bash benchmarks/gpu_check.sh --cpu-dry-run     # here: the same stages at tiny shapes on CPU (2-4 min on a
#                                                  # shared 2-core CPU; tests/test_bench.py runs its env stage)
#
# Device call (the repo's working tree travels; carry the wheels, nothing else is needed there: the
# image has torch, triton, einops, pytest, tokenizers, safetensors, huggingface_hub):
#   run(command="bash benchmarks/gpu_check.sh", carry=["runs/gpu_wheels"], timeout_s=540)
# Everything comes back in $OUT as two files (the device returns at most 8): gpu_check.log (all
# output) and results.json (per stage: command, exit status, seconds, and the JSON it wrote),
# rewritten after every stage so a run cut off at its limit still returns what it measured.
#
# Budget: stages run in the order below; each gets at most its own cap and what is left of
# GPU_CHECK_BUDGET_S (default 450 s); a stage that would start with under 20 s left is skipped.
# Priority order: parity tests first (they decide which fast path may become the default), then the
# headline at max batch, then batch 1 and the compile test (minutes of torch.compile, last).
set -uo pipefail

if [[ ${1:-} == --fetch-wheels ]]; then
  mkdir -p runs/gpu_wheels
  exec python3 -m pip download -q --no-deps --only-binary=:all: fla-core==0.6.0 transformers==5.24.0 -d runs/gpu_wheels
fi

DRY=0
if [[ ${1:-} == --cpu-dry-run ]]; then DRY=1; shift; fi
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}  # per-stage JSON (and plots) before they are merged
BUDGET=${GPU_CHECK_BUDGET_S:-450}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

if (( DRY )); then
  # the same stages, tiny: the `tiny` shape, CPU, bf16 (AMX here), short contexts, a 2.25 GiB "device"
  # for --batch max (2 GiB are kept free: ~30 MB of rows, ~150 of the tiny shape)
  PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DEV=cpu; SHAPE=tiny; MEM=(--memory-gib 2.03); CTX=64,128,224; STEPS=4; GEN=224; PROMPT=32; B1PROMPT=32; B1GEN=32
  FAST=(--ssm-dtype model)  # the fused Triton step needs CUDA (tests/model/test_kernels.py runs its math in Triton's interpreter)
  PARITY=(--shape tiny --prompt-len 64 --steps 16)
else
  PY=${PYTHON:-python3}
  WHEELS=$(ls runs/gpu_wheels/*.whl .whl/*.whl 2>/dev/null)
  if [[ -n $WHEELS ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  else
    echo "no wheels in runs/gpu_wheels: run 'bash benchmarks/gpu_check.sh --fetch-wheels' here and carry runs/gpu_wheels"
    export PYTHONPATH=$PWD
  fi
  DEV=cuda; SHAPE=llama-3.2-3b; MEM=(); CTX=1024,2048,4096,8192; STEPS=32; GEN=8192; PROMPT=256; B1PROMPT=256; B1GEN=512
  PARITY=(--shape llama-3.2-3b --prompt-len 512 --steps 64)
  FAST=(--fused-decode --ssm-dtype model)
fi
M1=("$PY" -m m1)  # an array, not a function: `timeout` runs programs
BENCH=(--shape "$SHAPE" --device "$DEV" --dtype bfloat16)
# the headline generation (prompt 256 + gen 8192), each model at its max batch, measured at 4 contexts
CTXRUN=(--batch max "${MEM[@]}" --prompt-len "$PROMPT" --gen-len "$GEN" --context "$CTX" --steps "$STEPS")
# the CUDA-only tests that decide the fast paths (fused kernel, graphs vs eager, fla scan); skipped on CPU
TESTS="fused_state_step_on_cuda or cuda_engine_matches_cpu_reference or fla_kernel_equals_reference or hybrid_on_cuda_with_kernel"

# times in milliseconds from date +%s%N (bash arithmetic: no bc on the device image assumed)
T_START=$(date +%s%N)
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
secs() { printf '%d.%d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }
STAGES_TSV=$WORK/stages.tsv; : > "$STAGES_TSV"

collect() {  # results.json: every stage so far with its JSON outputs
  $PY - "$STAGES_TSV" "$OUT/results.json" "$DRY" <<'PY'
import json, os, sys, platform
tsv, out, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
stages = []
for line in open(tsv):
    name, rc, secs, files, cmd = line.rstrip("\n").split("\t")
    data = {}
    for f in filter(None, files.split(",")):
        try:
            data[os.path.basename(f)] = json.load(open(f))
        except (OSError, ValueError) as e:
            data[os.path.basename(f)] = {"unreadable": str(e)}
    stages.append({"stage": name, "rc": int(rc), "seconds": float(secs), "command": cmd, "json": data})
meta = {"cpu_dry_run": dry, "host": platform.node(), "total_seconds": round(sum(s["seconds"] for s in stages), 1)}
tmp = out + ".tmp"
json.dump({**meta, "stages": stages}, open(tmp, "w"), indent=1)
os.replace(tmp, out)
PY
}

# stage NAME CAP_S JSON_FILES COMMAND...: run with a timeout, record rc / seconds / outputs
stage() {
  local name=$1 cap=$2 files=$3; shift 3
  local left=$(( BUDGET - $(ms_since "$T_START") / 1000 ))
  (( left < cap )) && cap=$left
  if (( cap < 20 )); then
    echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" 124 0 "" "skipped: budget" >> "$STAGES_TSV"; collect; return
  fi
  echo "=== $name (at most ${cap}s) $(date +%T): $*"
  local t0; t0=$(date +%s%N)
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  local took; took=$(secs "$(ms_since "$t0")")
  echo "=== $name: rc $rc in ${took} s ($(( $(ms_since "$T_START") / 1000 )) s since start)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$files" "$(echo "$*" | tr '\n\t' '  ')" >> "$STAGES_TSV"
  collect
}

run_stage() {
  local s=$1 w=$WORK
  case $s in
    env)
      stage env 30 "" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo 'no nvidia-smi';
        $PY -c \"import torch, transformers, importlib.util as u; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'triton', u.find_spec('triton') is not None, 'fla', u.find_spec('fla') is not None)\"" ;;
    tests)  # fused decode kernel vs reference, engine eager / CUDA graphs vs the CPU reference, fla's scan
      # (exit 5 = nothing selected: a renamed test shows here, also in the dry run where all skip)
      stage tests 150 "" $PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/model/test_kernels.py tests/engine/test_engine.py \
        -k "($TESTS) and not compile" ;;
    parity)  # bf16 SSM state and fused step vs float32 state / torch step at the headline shape
      stage parity 120 "$w/parity.json" $PY benchmarks/gpu_parity.py "${PARITY[@]}" --device "$DEV" --json "$w/parity.json" ;;
    ctx-max)  # headline, today's default path: max batch, decode at 4 contexts, integrated over gen 8192;
      # the 1 x 8192 prefill of each model (TTFT at 8k) is the prefill_s of its context-8192 row
      stage ctx-max 170 "$w/ctx_max.json" "${M1[@]}" bench "${BENCH[@]}" "${CTXRUN[@]}" --json "$w/ctx_max.json" ;;
    ctx-max-fast)  # the same with the fused Triton step and the SSM state in bf16 (vLLM's default)
      stage ctx-max-fast 170 "$w/ctx_max_fast.json" "${M1[@]}" bench "${BENCH[@]}" "${CTXRUN[@]}" "${FAST[@]}" --json "$w/ctx_max_fast.json" ;;
    b1)  # batch 1, gen 512, whole generations: the roofline fraction of both models
      stage b1 100 "$w/b1.json" "${M1[@]}" bench "${BENCH[@]}" --batch 1 --prompt-len "$B1PROMPT" --gen-len "$B1GEN" --json "$w/b1.json" ;;
    b1-fast)
      stage b1-fast 100 "$w/b1_fast.json" "${M1[@]}" bench "${BENCH[@]}" --batch 1 --prompt-len "$B1PROMPT" --gen-len "$B1GEN" \
        "${FAST[@]}" --json "$w/b1_fast.json" ;;
    tests-compile)  # torch.compile'd step vs the CPU reference (compiling takes minutes: last)
      stage tests-compile 180 "" $PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/engine/test_engine.py \
        -k "cuda_engine_matches_cpu_reference and compile" ;;
    # --- not in the default list (each one a whole-generation run of minutes at max batch)
    l3b-max)
      stage l3b-max 560 "$w/l3b_max_g8192.json" "${M1[@]}" bench "${BENCH[@]}" --batch max --gen-len 8192 --json "$w/l3b_max_g8192.json" ;;
    l3b-max-fast)
      stage l3b-max-fast 560 "$w/l3b_max_g8192_fast.json" "${M1[@]}" bench "${BENCH[@]}" --batch max --gen-len 8192 \
        "${FAST[@]}" --json "$w/l3b_max_g8192_fast.json" ;;
    b1-compile)
      stage b1-compile 400 "$w/b1_compile.json" "${M1[@]}" bench "${BENCH[@]}" --batch 1 --gen-len "$B1GEN" --compile \
        --json "$w/b1_compile.json" ;;
    ctx-max-h100)  # the max batch an 80 GB H100 fits, for comparison with docs/benchmarks.md's H100 rows
      stage ctx-max-h100 170 "$w/ctx_max_h100.json" "${M1[@]}" bench "${BENCH[@]}" "${CTXRUN[@]}" --memory-gib 74.5 --json "$w/ctx_max_h100.json" ;;
    engine-vs-hf)  # issue #6: the engine vs transformers' generate
      stage engine-vs-hf 300 "$w/engine_vs_hf_l3b.json" $PY benchmarks/bench_engine.py --shape "$SHAPE" --device "$DEV" \
        --dtype bfloat16 --batch 1,16 --new-tokens 256 --repeats 2 --json "$w/engine_vs_hf_l3b.json" ;;
    *) echo "unknown stage $s"; printf '%s\t%s\t0\t\t%s\n' "$s" 2 "unknown stage" >> "$STAGES_TSV" ;;
  esac
}

DEFAULT=(env tests parity ctx-max ctx-max-fast b1 b1-fast tests-compile)
(( $# )) || set -- "${DEFAULT[@]}"
echo "gpu_check: stages $* (budget ${BUDGET}s, dry run $DRY, work $WORK)"
for s in "$@"; do run_stage "$s"; done
collect
echo "=== stage times"
awk -F'\t' '{printf "  %-14s rc %-3s %7.1f s\n", $1, $2, $3}' "$STAGES_TSV"
echo "=== total $(( $(ms_since "$T_START") / 1000 )) s; results in $OUT/results.json, log in $OUT/gpu_check.log"
# non-zero if any stage failed (timeouts included), so a caller sees it at once
! awk -F'\t' '$2 != 0 {bad=1} END {exit !bad}' "$STAGES_TSV"
