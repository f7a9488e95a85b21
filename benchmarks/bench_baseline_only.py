"""Measure only the all-attention baseline of a --shape at its largest batch (finishing a bench run
whose baseline half did not fit the device time). Usage: python benchmarks/bench_baseline_only.py SHAPE GEN OUT.json"""
import json
import sys
from dataclasses import asdict

import torch

from m1.bench import SHAPES, _NullTokenizer, largest_batch, measure, measure_bandwidth, shape_model
from m1.engine import Engine

shape, gen, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = shape_model(shape, list(range(SHAPES[shape]["num_hidden_layers"])), torch.bfloat16, "cuda")
eng = Engine(model, _NullTokenizer(), max_cache_bytes=1 << 62)
b = largest_batch(eng, 256, gen)
eng.max_batch_size = b
print("largest batch", b, flush=True)
row = measure(eng, f"{shape} all-attention", b, 256, gen, measure_bandwidth("cuda"))
row.at_max_batch = True
print(row, flush=True)
json.dump(asdict(row), open(out, "w"), indent=2)
