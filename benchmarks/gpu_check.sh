#!/usr/bin/env bash
# GPU checks for a lent H100/H200 (see docs/benchmarks.md): install the carried wheels (no internet there),
# run the CUDA-only tests, then decode benchmarks. Usage on the device machine, from the repo root:
#   bash benchmarks/gpu_check.sh STAGE...   (wheels in .whl/: fla-core, transformers; stages below)
# A 30-minute device budget fits: `tests small l3b-b1 l3b-b1-fused engine-vs-hf` (~10 min) in one
# call, then `l3b-max` (~7 min) and `l3b-max-fused` in calls of their own (each under 10 minutes).
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
m1() { python3 -m m1 "$@"; }
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton, transformers, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__)" ;;
    tests)  # every CUDA-only test
      python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" ;;
    tests-quick)  # without the torch.compile variant (minutes of compiling)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests -k "not compile" 2>&1 | tee "$OUT/gpu_tests.log" ;;
    small)
      m1 bench --shape smollm2-135m --device cuda --dtype bfloat16 --batch 1,16 --gen-len 512 --json "$OUT/smollm2_b1_16_g512.json" ;;
    l3b-b1)
      m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch 1 --gen-len 512 --json "$OUT/l3b_b1_g512.json" ;;
    l3b-max)  # the headline: each model at the largest batch that fits, gen 8192
      m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch max --gen-len 8192 --json "$OUT/l3b_max_g8192.json" ;;
    l3b-max-fused)  # the same with the fused Triton Mamba decode kernel
      m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch max --gen-len 8192 --fused-decode --json "$OUT/l3b_max_g8192_fused.json" ;;
    l3b-b1-compile)  # torch.compile'd step under CUDA graphs: fuses norms, RoPE, softmax (batch-1 roofline)
      m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch 1 --gen-len 512 --compile --json "$OUT/l3b_b1_g512_compile.json" ;;
    l3b-max-fused-bf16state)  # + the SSM state kept in bf16 between steps (vLLM's default): the byte limit rises
      m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch max --gen-len 8192 --fused-decode --ssm-dtype model --json "$OUT/l3b_max_g8192_fused_bf16state.json" ;;
    l3b-b1-fused)
      m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch 1 --gen-len 512 --fused-decode --json "$OUT/l3b_b1_g512_fused.json" ;;
    engine-vs-hf)  # issue #6: the engine vs transformers' generate, both shapes, batch 1 and 16
      python3 benchmarks/bench_engine.py --shape smollm2-135m --device cuda --dtype bfloat16 --batch 1,16 --new-tokens 256 --repeats 2 --json "$OUT/engine_vs_hf_smollm2.json"
      python3 benchmarks/bench_engine.py --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch 1,16 --new-tokens 256 --repeats 2 --json "$OUT/engine_vs_hf_l3b.json" ;;
    l3b-128)  # equal batch
      m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch 128 --gen-len 4096 --json "$OUT/l3b_b128_g4096.json" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
