"""One bf16 verify forward of the embedded target over a few tree shapes after 350 cached tokens,
with row_invariant attention gathering a tree's rows by depth only (as at d6bc1b5) and as now (by
depth or by chain, whichever takes fewer products); both give the same logits.

    python results/tree_attention/row_invariant_chains/forward_times.py
"""
import statistics as st
import subprocess
import time
import types

import torch

old_source = subprocess.run(["git", "show", "d6bc1b5:specsweep/backends/row_invariant.py"], capture_output=True, text=True, check=True).stdout
hf_old = types.ModuleType("hf_old")
exec(compile(old_source, "hf_old", "exec"), hf_old.__dict__)
from specsweep.backends import row_invariant as hf_new
from specsweep.app import models
from specsweep.backends import hardware
from specsweep.core.tree import Tree
from transformers import AttentionInterface, DynamicCache
from specsweep.backends.cache import truncate
from pathlib import Path; CACHE_DIR = Path.home() / ".cache/specsweep"
torch.set_num_threads(1)
d = models.resolve_model_dir("embedded:smollm2-135m-instruct", "t", CACHE_DIR)
model = models.load_model(d, hardware.Hardware(torch.device("cpu"), torch.bfloat16, "row_invariant", prepack_linear=True))
trees = {"binary(3)": Tree.binary(3), "2 branches 5+5": Tree((-1, 0, 1, 2, 3, -1, 5, 6, 7, 8)), "3 branches 5+5+5": Tree((-1,0,1,2,3,-1,5,6,7,8,-1,10,11,12,13)), "chain 15": Tree.chain(15)}
P = 350
cache = DynamicCache(config=model.config)
with torch.inference_mode():
    model(input_ids=torch.randint(1000, (1, P)), past_key_values=cache)
    res = {}
    for name, tree in trees.items():
        tokens = torch.randint(1000, (1, tree.num_nodes + 1))
        mask = tree.verify_mask(P, torch.bfloat16); pos = tree.verify_position_ids(P)
        for impl, fn in (("old", hf_old.row_invariant_attention), ("new", hf_new.row_invariant_attention)):
            AttentionInterface.register("row_invariant", fn)
            ts = []
            for i in range(25):
                t = time.perf_counter()
                out = model(input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
                ts.append(time.perf_counter() - t); truncate(cache, P)
            res[name, impl] = (st.median(ts[5:]) * 1e3, out)
        print("%-18s old %.2f ms  new %.2f ms  same logits %s" % (name, res[name, "old"][0], res[name, "new"][0], torch.equal(res[name, "old"][1], res[name, "new"][1])))
    ts = []
    for i in range(25):
        t = time.perf_counter(); model(input_ids=tokens[:, :1], past_key_values=cache); ts.append(time.perf_counter() - t); truncate(cache, P)
    print("one token %.2f ms" % (st.median(ts[5:]) * 1e3))
