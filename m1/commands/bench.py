"""``m1 bench``: decode throughput and memory, hybrid vs same-size transformer."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="decode tokens/s and memory vs batch and length, hybrid vs all-attention, vs byte limits",
        description="Measure decode throughput, time to first token and memory of a hybrid against its all-attention "
                    "twin through the same engine (EOS ignored), with the byte-limit ratio that memory traffic allows "
                    "and, on CUDA, the fraction of the bandwidth roofline. --shape builds random-weight models.",
        epilog="examples:\n  m1 bench --shape smollm2-135m --batch 1,16 --gen-len 256,1024\n"
               "  m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch 1,max --gen-len 8192\n"
               "  m1 bench --model runs/hybrid --baseline runs/teacher --batch 16\n"
               "  m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch max --gen-len 8192 "
               "--context 1024,2048,4096,8192",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="smollm2-135m | llama-3.2-1b | llama-3.2-3b | tiny (random weights; tiny: tests, dry runs)")
    src.add_argument("--model", help="checkpoint directory (the hybrid)")
    p.add_argument("--baseline", help="with --model: the checkpoint to compare against (e.g. the teacher)")
    p.add_argument("--layout", default="m1", help="with --shape: m1 (1 in 5 attention) | all-attention | FRACTION")
    p.add_argument("--batch", default="1,16",
                   help="comma-separated batch sizes; 'max' = the largest batch whose state fits, per model (default 1,16)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", default="1024", help="comma-separated generation lengths (default 1024)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, decode eagerly instead of replaying CUDA graphs (to see what they buy)")
    p.add_argument("--fused-decode", action="store_true",
                   help="on CUDA, update the Mamba state with the fused Triton kernel (m1.kernels.mamba_state_step_fused)")
    p.add_argument("--compile", action="store_true",
                   help="decode with the torch.compile'd static step (fuses the elementwise kernels; compiling takes minutes)")
    p.add_argument("--ssm-dtype", default="float32", choices=["float32", "model"],
                   help="dtype of the Mamba SSM state between steps: float32 (default) or the model dtype (vLLM's default)")
    p.add_argument("--context", default=None,
                   help="comma-separated contexts L (e.g. 1024,2048,4096,8192): time --steps decode steps with every "
                        "row at L tokens (one prefill) instead of whole generations, and integrate them into the "
                        "throughput of the --prompt-len + --gen-len generation (see m1.bench.integrate_generation)")
    p.add_argument("--steps", type=int, default=32, help="with --context: timed decode steps per L (default 32)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="with --batch max: fit the batch into a device of this many GiB instead of the free memory "
                        "(e.g. 80 for an H100's batch on an H200)")
    p.add_argument("--json", dest="json_path", help="write all rows as JSON here (rewritten after each measurement)")
    p.add_argument("--resume", action="store_true",
                   help="with --json: keep the rows an interrupted run already measured there (same settings) "
                        "and measure only the missing ones")
    p.add_argument("--plot", dest="plot_path", help="PNG of tokens/s vs batch (default: beside --json)")
    p.set_defaults(func=run)


def run(a) -> None:
    from ..bench import markdown_table, parse_ints, run_bench

    plot_path = a.plot_path or (a.json_path.rsplit(".", 1)[0] + ".png" if a.json_path else None)
    rows = run_bench(shape=a.shape, model=a.model, baseline=a.baseline, layout=a.layout,
                     batches=parse_ints(a.batch, "--batch", allow_max=True), prompt_len=a.prompt_len,
                     gen_lens=parse_ints(a.gen_len, "--gen-len"), dtype=a.dtype, device=a.device,
                     json_path=a.json_path, plot_path=plot_path, cuda_graphs=a.cuda_graphs,
                     fused_decode=a.fused_decode, compile=a.compile, ssm_dtype=a.ssm_dtype, resume=a.resume,
                     contexts=None if a.context is None else parse_ints(a.context, "--context"), steps=a.steps,
                     memory_gib=a.memory_gib,
                     log=lambda m: print(m, file=sys.stderr))
    print(markdown_table(rows))
