"""Losslessness audit: a strategy's greedy outputs against the target's own (the draft=none run).

Greedy speculative decoding must give the target's greedy output token for token (README,
Definitions). A verify forward scores several rows at once, and on many kernels a row's logits then
differ from the one-row step's in the last bits (docs/exactness.md: bf16 down_proj without AMX, fp32 linears), so where
the target's two best tokens are as good as tied the argmax may flip without any bug. The audit
tells the two apart per sample (matched by task id): at the first differing position it reads the
reference run's margin there (top-1 minus top-2 logit, recorded by the autoregressive engine path
with the top-1 logit) and calls the divergence

- a **tie** when margin <= ``TIE_ULPS[dtype]`` ulps of the target's dtype at the two logits'
  magnitude (the larger of |top-1| and |top-2|), ulp(x) = 2^(floor(log2 |x|) - mantissa bits):
  bf16 has 7 bits, so 1 ulp is 0.125 at a logit of 20 (8 ulps: 1.0); fp32 has 23, so 1 ulp is
  2e-6 at 20 (64 ulps: 1.2e-4). The allowance is the rounding noise measured on the embedded
  SmolLM2 (one-row steps against 16-row chain verifies, 3 HumanEval prompts x 47 tokens): a logit
  moved by up to 3 bf16 ulps on the non-AMX bf16 kernels (flips seen there sat at 0 and 1 ulp), by
  up to 31 fp32 ulps in fp32; a margin moves by two logits' errors, hence 8 and 64 (fp16 is given
  bf16's, unmeasured). A real bug flips tokens at margins spread over the whole range, so it shows
  in some sample as a margin far above these;
- **real** otherwise, and also where the reference recorded no margin (it cannot be shown a tie).

The cost of the rule: bf16 logits are coarse, and about 1 position in 5 of a bf16 greedy run has a
margin within 8 ulps, so a wrong token there passes as a tie; a bug that changes outputs changes
them in many samples, and one real divergence makes the verdict DIVERGED.

Verdict per job (``lossless``): ``exact`` (every compared sample identical), ``ties`` (divergences,
all at ties), ``DIVERGED`` (some divergence is real), ``n/a`` (no reference run, sampling at T > 0,
no samples to compare), ``reference`` (the job is the reference itself). Pure functions on the
samples lists of samples.jsonl (dicts with task_id, output_ids; the reference's also margins,
top_logits); nothing here reads files or imports torch.
"""

from __future__ import annotations

import math

MANTISSA_BITS = {"bfloat16": 7, "float16": 10, "float32": 23, "float64": 52}
TIE_ULPS = {"bfloat16": 8.0, "float16": 8.0, "float32": 64.0, "float64": 64.0}  # see the module docstring
EXACT, TIES, DIVERGED, NA, REFERENCE = "exact", "ties", "DIVERGED", "n/a", "reference"


def _name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in MANTISSA_BITS:
        raise ValueError(f"audit: no ulp for dtype {dtype!r} (known: {', '.join(MANTISSA_BITS)})")
    return name


def ulp(value: float, dtype) -> float:
    """The spacing of ``dtype``'s numbers at |value| (``dtype`` as torch names it, with or
    without the ``torch.`` prefix, or a torch.dtype)."""
    _, exponent = math.frexp(abs(value) or 2.0 ** -126)  # |value| = m * 2^exponent, m in [0.5, 1)
    return 2.0 ** (exponent - 1 - MANTISSA_BITS[_name(dtype)])


def tie_ulps(dtype) -> float:
    """The largest margin, in ulps of ``dtype``, that is a numeric tie."""
    return TIE_ULPS[_name(dtype)]


def margin_ulps(margin: float, top_logit: float, dtype) -> float:
    """The top-1 minus top-2 margin in ulps of ``dtype`` at the two logits' magnitude."""
    return margin / ulp(max(abs(top_logit), abs(top_logit - margin)), dtype)


def is_tie(margin: float | None, top_logit: float | None, dtype, allowance: float | None = None) -> bool:
    """A divergence at this margin is a numeric tie (None: not recorded, so not a tie);
    ``allowance`` in ulps, default ``tie_ulps(dtype)``."""
    if margin is None or top_logit is None:
        return False
    return margin_ulps(margin, top_logit, dtype) <= (tie_ulps(dtype) if allowance is None else allowance)


def compare_sample(output: list[int], reference: dict, dtype, allowance: float | None = None) -> dict:
    """One sample's output ids against the reference sample -> {task_id, status (exact / tie /
    diverged), position, margin, margin_ulps, token, reference_token}; position and the rest are
    None for an exact match. A length difference after a common prefix diverges where the shorter
    one ends."""
    ref = reference["output_ids"]
    result = {"task_id": reference.get("task_id"), "status": "exact", "position": None, "margin": None,
              "margin_ulps": None, "token": None, "reference_token": None}
    if output == ref:
        return result
    position = next((i for i, (a, b) in enumerate(zip(output, ref)) if a != b), min(len(output), len(ref)))
    margins, tops = reference.get("margins") or [], reference.get("top_logits") or []
    margin = margins[position] if position < len(margins) else None
    top = tops[position] if position < len(tops) else None
    result.update(position=position, margin=margin,
                  margin_ulps=None if margin is None or top is None else margin_ulps(margin, top, dtype),
                  token=output[position] if position < len(output) else None,
                  reference_token=ref[position] if position < len(ref) else None,
                  status="tie" if is_tie(margin, top, dtype, allowance) else "diverged")
    return result


def compare(samples: list[dict], reference: list[dict], dtype, allowance: float | None = None) -> dict:
    """A job's samples against the reference run's -> the audit record (JSON-ready): lossless
    (exact / ties / DIVERGED / n/a), counts of compared, exact, tie and real divergences,
    unmatched task ids (in one run only), the worst divergence (the largest margin in ulps, an
    unrecorded margin worst of all) and every divergence."""
    by_task = {s.get("task_id"): s for s in reference}
    results = [compare_sample(s["output_ids"], by_task[s.get("task_id")], dtype, allowance)
               for s in samples if s.get("task_id") in by_task]
    divergences = [r for r in results if r["status"] != "exact"]
    real = [r for r in divergences if r["status"] == "diverged"]
    unmatched = len({s.get("task_id") for s in samples} ^ set(by_task))
    if not results:
        verdict = NA
    else:
        verdict = DIVERGED if real else TIES if divergences else EXACT
    worst = max(divergences, key=lambda r: math.inf if r["margin_ulps"] is None else r["margin_ulps"], default=None)
    return {"lossless": verdict, "dtype": _name(dtype), "tie_ulps": tie_ulps(dtype) if allowance is None else allowance,
            "compared": len(results), "exact": len(results) - len(divergences), "ties": len(divergences) - len(real),
            "diverged": len(real), "unmatched": unmatched, "worst": worst, "divergences": divergences,
            **({"reason": "no sample matches the reference's task ids"} if not results else {})}


def not_audited(reason: str, verdict: str = NA) -> dict:
    """The audit record of a job that is not compared (n/a, or the reference itself)."""
    return {"lossless": verdict, "reason": reason}


def greedy(decode: dict | None) -> bool:
    """The decode settings are greedy, as `specsweep.core.sampling.Sampling.greedy` decides
    (temperature 0, or top_k 1)."""
    decode = decode or {}
    return float(decode.get("temperature") or 0.0) == 0.0 or int(decode.get("top_k") or 0) == 1


def describe(divergence: dict | None) -> str:
    """One divergence in words: task, position, margin (and in ulps)."""
    if not divergence:
        return "-"
    margin = divergence["margin"]
    size = ("margin not recorded" if margin is None else f"margin {margin:.6g}"
            + ("" if divergence["margin_ulps"] is None else f" ({divergence['margin_ulps']:.3g} ulp)"))
    return f"task {divergence['task_id']} at token {divergence['position']}, {size}"


def columns(record: dict | None) -> dict:
    """The audit's flat columns for summary.csv and the bench's rows."""
    record = record or not_audited("not audited")
    return {"lossless": record["lossless"], "exact_samples": record.get("exact"),
            "tie_divergences": record.get("ties"), "real_divergences": record.get("diverged"),
            "worst_divergence": describe(record.get("worst")) if record.get("worst") else None}
