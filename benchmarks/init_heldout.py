"""Held-out next-token loss of attention-initialised vs randomly initialised hybrids.

    python benchmarks/init_heldout.py --teacher smollm2-135m --texts 100 --max-len 256

Texts: GSM8K test question + reference solution (shipped in m1/tasks/data). Prints one line per
model: mean NLL per token (nats) and perplexity.
"""

import argparse
import time

import torch

from m1.model.convert import build_hybrid, calibrate, calibration_texts, default_attention_layers, parse_layout
from m1.model.teachers import load_teacher
from m1.tasks import load_task
from m1.train.heldout import heldout_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--texts", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--attn-layers", default=None)
    a = ap.parse_args()
    t = load_teacher(a.teacher)
    n = t.model.config.num_hidden_layers
    layers = parse_layout(a.attn_layers, n) if a.attn_layers else default_attention_layers(n)
    texts = [f"{p.question}\n{p.solution}" for p in load_task("gsm8k", split="test")[:a.texts]]
    print(f"teacher {a.teacher}; attention layers {layers}; {len(texts)} GSM8K test solutions, <= {a.max_len} tokens")
    cal = calibrate(t.model, t.tokenizer, calibration_texts(16))
    models = {"teacher": lambda: t.model,
              "hybrid, attention init": lambda: build_hybrid(t.model, layers, calibration=cal),
              "hybrid, random init": lambda: build_hybrid(t.model, layers, init="random")}
    for name, make in models.items():
        t0 = time.time()
        with torch.no_grad():
            r = heldout_loss(make().eval(), t.tokenizer, texts, max_len=a.max_len)
        print(f"{name:24s} nll {r.nll:.3f}  ppl {r.perplexity:10.1f}  tokens {r.tokens}  ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
