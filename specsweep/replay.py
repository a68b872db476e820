"""Replay model-free chain drafters on a greedy run's outputs: exact tokens per step, no target.

Under greedy decoding every lossless strategy emits the target's own output, so how many draft
tokens a step gets accepted depends only on that output and on the drafter. Replaying the drafter
over a recorded output (a greedy run's samples.jsonl) gives exactly the steps, tokens per step and
drafted tokens the engine would see, in seconds instead of a decode per configuration. Each step
is fed back as the engine does: ``on_verified(accepted)``, then ``on_scored`` with the target's
choices along the accepted path (the next output tokens: the target is greedy).

    python -m specsweep experiment=best draft=none dataset.limit=95 decode.max_new_tokens=200
    python -m specsweep.replay outputs/<date>/<time>/samples.jsonl \\
        --ours "best=experiment=best" "no-recycling=experiment=best draft.recycle_tokens=0"

Speed then follows from the verify cost of the drafted sizes (a forward over n tokens, in one-token
steps), which `python -m specsweep.costs` measures; drafters that need a model are out of scope.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from specsweep.bench import compose_cfg
from specsweep.drafters import BuildContext, build_drafter, model_paths
from specsweep.errors import SpecsweepError
from specsweep.run import decoding_settings


def replay(drafter, depth: int, samples: list[dict]) -> dict:
    """Decode every sample's output again with ``drafter`` proposing chains of up to ``depth`` tokens."""
    vocab = 1 + max(max(s["prompt_ids"] + s["output_ids"]) for s in samples)
    steps = drafted = accepted_total = 0
    sizes: dict[int, int] = {}  # tokens per verify forward (root included) -> count
    for sample in samples:
        prompt, out = sample["prompt_ids"], sample["output_ids"]
        ids = torch.tensor([prompt + out])
        drafter.reset(ids[:, :len(prompt)])
        done = 1  # the prefill's token
        while done < len(out):
            room = len(out) - done - 1
            draft = drafter.propose(ids[:, :len(prompt) + done], min(depth, room)).tokens.tolist() if room else []
            accepted = 0
            while accepted < len(draft) and draft[accepted] == out[done + accepted]:
                accepted += 1
            if room:  # as in the engine: the hooks follow a proposal
                drafter.on_verified(accepted)
                chosen = torch.tensor(out[done:done + accepted + 1])  # the target's choices along the path
                drafter.on_scored(torch.tensor(out[done - 1:done + accepted]),
                                  torch.nn.functional.one_hot(chosen, vocab).float())
            steps, drafted, accepted_total = steps + 1, drafted + len(draft), accepted_total + accepted
            sizes[len(draft) + 1] = sizes.get(len(draft) + 1, 0) + 1
            done += accepted + 1
    tokens = sum(len(s["output_ids"]) - 1 for s in samples)
    return {"steps": steps, "tokens_per_step": tokens / steps, "drafted_per_step": drafted / steps,
            "acceptance_rate": accepted_total / drafted if drafted else None, "verify_sizes": dict(sorted(sizes.items()))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path, help="samples.jsonl of a greedy run (prompt_ids, output_ids)")
    parser.add_argument("--ours", nargs="+", required=True, help="NAME=OVERRIDES (space-separated Hydra overrides)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    samples = [json.loads(line) for line in args.samples.read_text().splitlines() if line.strip()]
    if not samples:
        raise SpecsweepError(f"{args.samples}: no samples")
    rows = []
    for spec in args.ours:
        name, _, overrides = spec.partition("=")
        cfg = compose_cfg(overrides.split())
        if model_paths(cfg.draft) or cfg.draft.kind == "none":
            raise SpecsweepError(f"{name}: replay runs model-free chain drafters only, not draft={cfg.draft.name}")
        sampling, shape = decoding_settings(cfg)
        if not sampling.greedy or not shape.is_chain:
            raise SpecsweepError(f"{name}: replay needs greedy decoding and tree=chain")
        if cfg.draft.get("recycle_branches", 1) > 1:  # its branches need the target's second choices
            raise SpecsweepError(f"{name}: replay knows only the target's first choices, not recycle_branches > 1")
        drafter = build_drafter(cfg.draft, BuildContext(None, None, sampling, None, None, {}, Path(cfg.cache_dir)))
        drafter.prepare([s["prompt_ids"] for s in samples])
        rows.append({"strategy": name, "overrides": overrides, **replay(drafter, shape.num_nodes, samples)})
    table = Table("strategy", "steps", "tokens/step", "drafted/step", "acc. rate",
                  title=f"replay of {len(samples)} greedy outputs ({args.samples})")
    for r in rows:
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        table.add_row(r["strategy"], str(r["steps"]), f"{r['tokens_per_step']:.3f}", f"{r['drafted_per_step']:.2f}", rate)
    Console().print(table)
    if args.out:
        args.out.write_text(json.dumps({"samples": str(args.samples), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SpecsweepError as error:
        raise SystemExit(f"error: {error}") from None
