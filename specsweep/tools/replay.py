"""Replay model-free chain drafters on a greedy run's outputs: exact tokens per step, no target.

Under greedy decoding every lossless strategy emits the target's own output, so how many draft
tokens a step gets accepted depends only on that output and on the drafter. Replaying the drafter
over a recorded output (a greedy run's samples.jsonl) gives exactly the steps, tokens per step and
drafted tokens the engine would see, in seconds instead of a decode per configuration. Each step
is fed back as the engine does: ``on_scored`` with the target's choices along the accepted path
(the next output tokens: the target is greedy).

    python -m specsweep experiment=best draft=none dataset.limit=95 decode.max_new_tokens=200
    python -m specsweep.tools.replay outputs/<date>/<time>/samples.jsonl \\
        --ours "best=experiment=best" "no-recycling=experiment=best draft.recycling=null"

Speed then follows from the verify cost of the drafted sizes (a forward over n tokens, in one-token
steps): with ``--curve`` (a verify-cost curve cached by `draft.length_policy: cost` in
cache_dir/costs/, or points such as ``16=1.78,32=2.42``, interpolated) the table adds each
strategy's mean cost per step and the speed it predicts against autoregressive decoding (tokens
over the summed t(rows)/t(1); the draft's own time left out). A strategy with
``draft.length_policy=cost`` is replayed with its policy choosing lengths by that curve, learning
acceptance online as in the engine. Drafters that need a model are out of scope.

    python -m specsweep.tools.replay samples.jsonl --curve 16=1.78,32=2.42 \
        --ours "fixed-31=experiment=best draft.length_policy=fixed" "cost=experiment=best"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from specsweep.app.run import decoding_settings, length_policy_name
from specsweep.core.draft_length import LengthPolicy, VerifyCosts
from specsweep.drafters import BuildContext, build_drafter, model_paths
from specsweep.errors import SpecsweepError
from specsweep.tools.bench import compose_cfg


class Absent:
    """What replay runs without (the target, its tokenizer, ...): a drafter that uses it is refused."""

    def __init__(self, what: str):
        self.what = what

    def _refuse(self, *args, **kwargs):
        raise SpecsweepError(f"replay runs model-free drafters only: this draft needs the {self.what}")

    __getattr__ = __len__ = __call__ = _refuse


def replay(drafter, depth: int, samples: list[dict], policy: LengthPolicy | None = None,
           ratios: list[float] | None = None) -> dict:
    """Decode every sample's output again with ``drafter`` proposing chains of up to ``depth`` tokens,
    cut by ``policy`` where given; ``ratios`` (t(m)/t(1) at index m, m = 1..depth + 1) adds the
    predicted cost and speed."""
    vocab = 1 + max(max(s["prompt_ids"] + s["output_ids"]) for s in samples)
    steps = drafted = accepted_total = 0
    cost = 0.0  # in one-token steps
    sizes: dict[int, int] = {}  # tokens per verify forward (root included) -> count
    for sample in samples:
        prompt, out = sample["prompt_ids"], sample["output_ids"]
        ids = torch.tensor([prompt + out])
        drafter.reset(ids[:, :len(prompt)])
        done = 1  # the prefill's token
        while done < len(out):
            room = len(out) - done - 1
            proposal = drafter.propose(ids[:, :len(prompt) + done], min(depth, room)) if room else None
            if policy is not None and proposal is not None:
                proposal = policy.cut(proposal)
            draft = [] if proposal is None else proposal.tokens.tolist()
            accepted = 0
            while accepted < len(draft) and draft[accepted] == out[done + accepted]:
                accepted += 1
            if policy is not None:
                policy.observe(proposal, accepted, None)
            if room:  # as in the engine: the hook follows a proposal
                chosen = torch.tensor(out[done:done + accepted + 1])  # the target's choices along the path
                drafter.on_scored(torch.tensor(out[done - 1:done + accepted]),
                                  torch.nn.functional.one_hot(chosen, vocab).float())
            steps, drafted, accepted_total = steps + 1, drafted + len(draft), accepted_total + accepted
            sizes[len(draft) + 1] = sizes.get(len(draft) + 1, 0) + 1
            cost += ratios[len(draft) + 1] if ratios is not None else 0.0
            done += accepted + 1
    tokens = sum(len(s["output_ids"]) - 1 for s in samples)
    result = {"steps": steps, "tokens_per_step": tokens / steps, "drafted_per_step": drafted / steps,
              "acceptance_rate": accepted_total / drafted if drafted else None,
              "verify_sizes": dict(sorted(sizes.items()))}
    if ratios is not None:
        result.update(cost_per_step=cost / steps, predicted_vs_ar=tokens / cost)
    if policy is not None:
        result["draft_length"] = policy.record()
    return result


def read_curve(spec: str, max_rows: int) -> VerifyCosts:
    """``spec``: a curve file of `specsweep.core.draft_length` (cache_dir/costs/*.json) or points
    ``m=t(m)/t(1),...`` (t(1) = 1 implied), interpolated linearly for m = 1..max_rows."""
    path = Path(spec)
    if path.is_file():
        costs = VerifyCosts(max_rows, path)
        if not costs.medians:
            raise SpecsweepError(f"--curve {spec}: no verify times in the file")
        costs.path = None  # replay never writes it
        return costs
    try:
        points = {1: 1.0} | {int(m): float(r) for m, r in (item.split("=") for item in spec.split(","))}
    except ValueError:
        raise SpecsweepError(f"--curve {spec}: neither a curve file nor points m=ratio,...") from None
    return VerifyCosts.from_ratios(points, max_rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path, help="samples.jsonl of a greedy run (prompt_ids, output_ids)")
    parser.add_argument("--ours", nargs="+", required=True, help="NAME=OVERRIDES (space-separated Hydra overrides)")
    parser.add_argument("--curve", help="verify-cost curve: a cache_dir/costs/*.json file or points m=t(m)/t(1),... "
                                        "(adds predicted speed; required by draft.length_policy=cost)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    samples = [json.loads(line) for line in args.samples.read_text().splitlines() if line.strip()]
    if not samples:
        raise SpecsweepError(f"{args.samples}: no samples")
    rows = []
    for spec in args.ours:
        name, _, overrides = spec.partition("=")
        cfg = compose_cfg(overrides.split())
        if model_paths(cfg.draft) or cfg.draft._target_ is None:
            raise SpecsweepError(f"{name}: replay runs model-free chain drafters only, not draft={cfg.draft.name}")
        sampling, shape = decoding_settings(cfg)
        if not sampling.greedy or not shape.is_chain:
            raise SpecsweepError(f"{name}: replay needs greedy decoding and tree=chain")
        absent = [Absent(what) for what in ("target", "tokenizer", "generator", "hardware", "draft models")]
        drafter = build_drafter(cfg.draft, BuildContext(*absent[:2], sampling, *absent[2:], Path(cfg.cache_dir)))
        recycling = getattr(drafter, "recycling", None)
        if recycling is not None and recycling.branches > 1:  # its branches need the target's second choices
            raise SpecsweepError(f"{name}: replay knows only the target's first choices, not "
                                 "draft.recycling.branches > 1")
        drafter.prepare([s["prompt_ids"] for s in samples])
        curve = read_curve(args.curve, shape.num_nodes + 1) if args.curve else None
        policy = None
        if length_policy_name(cfg) == "cost":
            if curve is None:
                raise SpecsweepError(f"{name}: draft.length_policy=cost chooses lengths by a verify-cost curve: "
                                     "give --curve")
            policy = LengthPolicy(curve)
        result = replay(drafter, shape.num_nodes, samples, policy, None if curve is None else curve.ratios())
        rows.append({"strategy": name, "overrides": overrides, **result})
    columns = ["strategy", "steps", "tokens/step", "drafted/step", "acc. rate"]
    columns += ["cost/step", "pred. x AR"] if args.curve else []
    table = Table(*columns, title=f"replay of {len(samples)} greedy outputs ({args.samples})"
                  + (f", curve {args.curve}" if args.curve else ""))
    for r in rows:
        rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        cells = [r["strategy"], str(r["steps"]), f"{r['tokens_per_step']:.3f}", f"{r['drafted_per_step']:.2f}", rate]
        if args.curve:
            cells += [f"{r['cost_per_step']:.3f}", f"{r['predicted_vs_ar']:.3f}"]
        table.add_row(*cells)
    Console().print(table)
    if args.out:
        args.out.write_text(json.dumps({"samples": str(args.samples), "curve": args.curve, "rows": rows},
                                       indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except SpecsweepError as error:
        raise SystemExit(f"error: {error}") from None
