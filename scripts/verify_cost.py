"""What one bf16 verify forward costs, in one-row steps, for a chain and for tree shapes (the
embedded target, `hardware=cpu-bf16`'s runner, 200 cached tokens, 1 thread):

    python scripts/verify_cost.py
"""
import time
from pathlib import Path

import torch

from specsweep.app import models
from specsweep.backends.hardware import Hardware
from specsweep.backends.target import make_runner
from specsweep.core.tree import Tree
from specsweep.drafters.lookahead import window_tree

torch.set_num_threads(1)
model_dir = models.resolve_model_dir("embedded:smollm2-135m-instruct", "target.path", Path.home() / ".cache/specsweep")
hw = Hardware(torch.device("cpu"), torch.bfloat16, "row_invariant", max_verify_tokens=32, prepack_linear=True,
              row_block="auto", lean_forward=True)
runner = make_runner(models.load_model(model_dir, hw), hw)
prompt = torch.randint(1000, (1, 200), generator=torch.Generator().manual_seed(0))


def ms_per_forward(tree: Tree | None, rows: int, reps: int = 30) -> float:
    runner.prefill(prompt, 64)
    tokens = torch.randint(1000, (1, rows), generator=torch.Generator().manual_seed(1))
    for i in range(reps + 3):
        if i == 3:
            start = time.perf_counter()
        runner.score(tokens, tree, 200)
        runner.keep(200, [])
    return (time.perf_counter() - start) / reps * 1000


one = ms_per_forward(None, 1)
print(f"one-row step: {one:.1f} ms")
for name, tree, rows in [("chain of 30 rows", None, 30), ("lookahead W5 N4 G5", window_tree(5, 4, 5), 30),
                         ("lookahead W3 N3 G2", window_tree(3, 3, 2), 10), ("binary depth 4", Tree.binary(4), 31)]:
    ms = ms_per_forward(tree, rows)
    print(f"{name} ({rows} rows): {ms:.1f} ms = {ms / one:.2f} steps")
