"""Each step's draft length chosen by expected accepted tokens per unit of verify cost.

``draft.length_policy: cost`` (chains only). A verify forward over m rows (the root and m - 1 draft
tokens) costs t(m), and how much more than a one-token step depends on the machine: with AMX (this
repo's Intel CPU, cpu-bf16) 16 rows cost about 1.2 one-token steps and 32 rows 1.5; on an AMD Zen 5
without AMX 1.78 and 2.42. So no fixed draft depth suits both. Each step, the drafter's proposal of L
tokens is cut to the n (0..L) that maximises

    (1 + E[accepted | n]) / t(n + 1),    E[accepted | n] = sum_{k <= n} prod_{j <= k} p(j),

where p(k) is the probability that draft token k is accepted given tokens 1..k-1 were, for this
kind of proposal (`Draft.kind`, e.g. prompt lookup's long match, short match, datastore, recycling).
Cutting a chain never changes what the target emits (greedy: the same tokens; sampling: the first
n tokens of a chain drawn from q are a chain drawn from q), so the policy is as lossless as the draft.

* `VerifyCosts` is t(m), m = 1..max rows, measured inside the engine: the running median of the
  engine's own verify steps of m rows (the span of `SampleStats.verify_s`: the forward, verification,
  the cache's roll-back and the drafter's hooks, on the run's real cache lengths, so oneDNN's kernel
  builds for new shapes are in it, which a microbenchmark repeating one cache length misses), made
  non-decreasing in m where noise says otherwise. It is seeded with the curve cached for this
  machine, lock, target and hardware profile in ``cache_dir/costs/<key>.json``; without one,
  `calibrate` times every m through the run's own runner on the first prompt (one untimed round,
  then `CALIBRATION_ROUNDS` timed ones, each forward one cache position further on, as engine steps
  that accept nothing), before that prompt's timer starts: about 6 s for 32 rows of the embedded
  model on 1 thread, once per key. A flat prior t(m) = 1 refined in the engine was the alternative;
  it would draft the full length until every m had been timed, and t(1) would come only from the
  rare steps with nothing to propose. `run_decode` writes the run's refined curve back at its end.
* `Acceptance` estimates p(k) per kind from the run's verified steps: position k was offered in a
  step when n >= k and tokens 1..k-1 were accepted; p(k) = (accepted_k + s m_k) / (offered_k + s)
  with prior mean m_1 = the kind's prior and m_k = p(k - 1) for deeper positions (an unseen depth
  is assumed as good as the one before it), strength s = `PRIOR_STRENGTH`.
* `choose_length` is the argmax above; `LengthPolicy` ties them to the engine (`cut`, `observe`).
  (Maximising 1 + E[accepted | n] - R t(n + 1) instead, with R the run's tokens per unit cost so
  far, is the renewal-reward optimum for a run's speed; replayed on HumanEval 0..123 it was no
  better than the per-step ratio, so the ratio stays.)
"""

from __future__ import annotations

import bisect
import json
import statistics
import time
from collections import Counter, deque
from datetime import datetime, timezone
from pathlib import Path

import torch

from specsweep.core.draft import Draft
from specsweep.core.sampling import greedy_tokens
from specsweep.files import write_json

POLICIES = ("fixed", "cost")
WINDOW = 31  # recent verify steps kept per row count (their median is t(m))
PRIOR_WEIGHT = 3  # a cached or calibrated t(m) counts as this many steps until the run's own replace it
CALIBRATION_ROUNDS = 3  # timed forwards of every row count without a cached curve (after an untimed round)
PRIOR_STRENGTH = 4.0  # pseudo-steps behind each position's prior mean
# P(first draft token accepted) before a kind has been verified, by the kind's name up to any ':'
# (prompt lookup's "long_match:8" -> "long_match"): roughly prompt lookup's rates on the target's
# outputs for HumanEval 0..123 (replay, the tuning split); other kinds DEFAULT_PRIOR
KIND_PRIORS = {"long_match": 0.8, "short_match": 0.3, "datastore": 0.5, "recycling": 0.4}
DEFAULT_PRIOR = 0.5


def choose_length(p: list[float], ratios: list[float]) -> int:
    """The draft length n in 0..len(p) maximising (1 + E[accepted | n]) / ratios[n + 1].

    ``p[k - 1]``: P(token k accepted | tokens 1..k-1 were); ``ratios[m]``: t(m)/t(1) for m rows
    (``ratios[0]`` unused, at least len(p) + 2 entries). Ties go to the shorter draft."""
    best_n, best = 0, 1.0 / ratios[1]
    expected, survive = 0.0, 1.0
    for n, pk in enumerate(p, 1):
        survive *= pk
        expected += survive
        value = (1.0 + expected) / ratios[n + 1]
        if value > best:
            best_n, best = n, value
    return best_n


class Acceptance:
    """p(k) per kind of proposal, from the run's verified steps (see the module docstring)."""

    def __init__(self, priors: dict[str, float] | None = None, default: float = DEFAULT_PRIOR,
                 strength: float = PRIOR_STRENGTH):
        self.priors, self.default, self.strength = dict(KIND_PRIORS if priors is None else priors), default, strength
        self.offered: dict[str | None, list[int]] = {}  # kind -> per position k (index k - 1): steps offering k
        self.accepted: dict[str | None, list[int]] = {}  # kind -> per position: steps accepting k
        self.steps: Counter = Counter()

    def probabilities(self, kind: str | None, n: int) -> list[float]:
        """p(1..n) for ``kind``."""
        offered, accepted = self.offered.get(kind, ()), self.accepted.get(kind, ())
        mean, s, out = self.prior(kind), self.strength, []
        for k in range(n):
            o, a = (offered[k], accepted[k]) if k < len(offered) else (0, 0)
            mean = (a + s * mean) / (o + s)
            out.append(mean)
        return out

    def prior(self, kind: str | None) -> float:
        return self.priors.get(kind.partition(":")[0] if kind else kind, self.default)

    def observe(self, kind: str | None, offered: int, accepted: int) -> None:
        """A verified chain of ``offered`` tokens of which the first ``accepted`` were kept."""
        if offered < 1:
            return
        seen = min(accepted + 1, offered)  # positions 1..seen were tested
        o, a = self.offered.setdefault(kind, []), self.accepted.setdefault(kind, [])
        if len(o) < seen:
            o.extend([0] * (seen - len(o)))
            a.extend([0] * (seen - len(a)))
        for k in range(seen):
            o[k] += 1
        for k in range(accepted):
            a[k] += 1
        self.steps[kind] += 1

    def describe(self, depth: int = 8) -> dict:
        return {str(kind): {"steps": self.steps[kind], "prior": self.prior(kind),
                            "p": [round(x, 4) for x in self.probabilities(kind, depth)],
                            "offered": self.offered[kind][:depth]}
                for kind in self.offered}


def monotone(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(c)]


class VerifyCosts:
    """t(m) for m = 1..``max_rows`` rows per verify forward, in seconds (see the module docstring).

    ``path``: the cached curve to seed from and to `save` to (None: neither)."""

    def __init__(self, max_rows: int, path: Path | None = None, key: dict | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows, self.path, self.key = max_rows, path, key
        self.windows = {m: deque(maxlen=WINDOW) for m in range(1, max_rows + 1)}
        self.medians: dict[int, float] = {}
        self.steps: Counter = Counter()  # the run's own verify steps per row count
        self.source, self.seeded, self._ratios = "prior t(m) = 1", {}, None
        if path is not None and Path(path).is_file():
            try:
                cached = {int(m): float(t) for m, t in json.loads(Path(path).read_text())["seconds"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                cached = {}  # an unreadable cache is measured again
            self.seed(cached, f"cache {path}")

    @classmethod
    def from_ratios(cls, ratios: dict[int, float], max_rows: int) -> VerifyCosts:
        """A fixed curve (replay): t(m)/t(1) at some m, the rest interpolated."""
        points = cls(max(max_rows, *ratios))
        points.medians = dict(ratios)
        table = points.ratios()
        costs = cls(max_rows)
        costs.seed({m: table[m] for m in range(1, max_rows + 1)}, "given")
        return costs

    def seed(self, seconds: dict[int, float], source: str) -> None:
        self.source, self.seeded = source, {m: t for m, t in seconds.items() if 1 <= m <= self.max_rows}
        for m, t in self.seeded.items():
            self.windows[m].clear()
            self.windows[m].extend([t] * PRIOR_WEIGHT)
            self.medians[m] = t
        self._ratios = None

    @property
    def needs_calibration(self) -> bool:
        return any(m not in self.medians for m in self.windows)

    def record(self, rows: int, seconds: float) -> None:
        """One verify step of ``rows`` rows took ``seconds``."""
        if rows in self.windows:
            window = self.windows[rows]
            window.append(seconds)
            self.medians[rows] = statistics.median(window)
            self.steps[rows] += 1
            self._ratios = None

    def ratios(self) -> list[float]:
        """[unused, t(1)/t(1), t(2)/t(1), ..., t(max_rows)/t(1)]: rows without a time interpolated
        linearly between the nearest timed ones (flat beyond them; all 1 with none), then the closest
        non-decreasing curve (a forward of more rows is taken to cost no less: a row that timed
        high by chance would otherwise never be chosen, so never timed again)."""
        if self._ratios is None:
            known = sorted(self.medians)
            if not known:
                self._ratios = [1.0] * (self.max_rows + 1)
            else:
                t = monotone([self._interpolate(known, m) for m in range(1, self.max_rows + 1)])
                self._ratios = [1.0] + [x / t[0] for x in t]
        return self._ratios

    def _interpolate(self, known: list[int], m: int) -> float:
        if m in self.medians:
            return self.medians[m]
        i = bisect.bisect(known, m)
        if i == 0 or i == len(known):
            return self.medians[known[min(i, len(known) - 1)]]
        lo, hi = known[i - 1], known[i]
        return self.medians[lo] + (self.medians[hi] - self.medians[lo]) * (m - lo) / (hi - lo)

    def calibrate(self, runner, prompt_ids: torch.Tensor, sync, rounds: int = CALIBRATION_ROUNDS) -> None:
        """Time forwards of m = 1..max_rows rows through ``runner`` after a prefill of ``prompt_ids``
        [1, P], each one cache position further on (the root kept, the rest rolled back), as engine
        steps that accept nothing: one untimed round (kernel builds), then ``rounds`` timed ones,
        alternately ascending and descending. The engine prefills again afterwards."""
        rows = list(range(1, self.max_rows + 1))
        cache_len = prompt_ids.shape[1]
        runner.prefill(prompt_ids, (rounds + 2) * self.max_rows)
        filler = prompt_ids[0].repeat(self.max_rows // prompt_ids.shape[1] + 1)[:self.max_rows][None]
        times: dict[int, list[float]] = {m: [] for m in rows}
        for round_ in range(rounds + 1):
            for m in (rows if round_ % 2 == 0 else rows[::-1]):
                sync()
                start = time.perf_counter()
                logits = runner.score(filler[:, :m].clone(), None, cache_len)
                greedy_tokens(logits).tolist()  # what verification reads
                if m > 1:
                    runner.keep(cache_len + 1, [])
                sync()
                if round_:
                    times[m].append(time.perf_counter() - start)
                cache_len += 1
        self.seed({m: statistics.median(ts) for m, ts in times.items()}, "calibrated")

    def save(self) -> None:
        if self.path is None or not self.medians:
            return
        write_json(Path(self.path), {"key": self.key, "seconds": {str(m): t for m, t in sorted(self.medians.items())},
                                     "steps": {str(m): c for m, c in sorted(self.steps.items())},
                                     "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def describe(self) -> dict:
        ratios = self.ratios()
        return {"source": self.source, "path": None if self.path is None else str(self.path),
                "t1_ms": round(self.medians[1] * 1e3, 3) if 1 in self.medians else None,
                "ratio": {m: round(ratios[m], 4) for m in range(1, self.max_rows + 1)},
                "seeded_ratio": ({m: round(t / self.seeded[1], 4) for m, t in sorted(self.seeded.items())}
                                 if 1 in self.seeded else None),
                "steps": {m: self.steps[m] for m in sorted(self.steps)}}


class LengthPolicy:
    """The engine's side: ``cut`` a chain proposal before verification, ``observe`` the result."""

    def __init__(self, costs: VerifyCosts, acceptance: Acceptance | None = None):
        self.costs, self.acceptance = costs, acceptance or Acceptance()
        self.chosen: dict[str | None, Counter] = {}  # kind -> draft length chosen -> steps
        self.proposed: Counter = Counter()  # proposal length -> steps

    def choose(self, kind: str | None, proposed: int) -> int:
        proposed = min(proposed, self.costs.max_rows - 1)
        return choose_length(self.acceptance.probabilities(kind, proposed), self.costs.ratios())

    def cut(self, draft: Draft) -> Draft:
        """``draft`` cut to its chosen length (trees pass unchanged)."""
        if draft.tree is not None:
            return draft
        proposed = draft.tokens.numel()
        n = self.choose(draft.kind, proposed) if proposed else 0
        self.proposed[proposed] += 1
        self.chosen.setdefault(draft.kind, Counter())[n] += 1
        if n == proposed:
            return draft
        return Draft(draft.tokens[:n], None if draft.probs is None else draft.probs[:n], None, draft.kind)

    def observe(self, draft: Draft | None, accepted: int, seconds: float | None) -> None:
        """A verified step: ``draft`` as verified (None: nothing drafted), ``accepted`` of its tokens
        kept (before any EOS cut), the step's verify time (None: not timed, e.g. replay)."""
        n = 0 if draft is None else draft.tokens.numel()
        if seconds is not None:
            self.costs.record(n + 1, seconds)
        if n and draft.tree is None:
            self.acceptance.observe(draft.kind, n, accepted)

    def record(self) -> dict:
        """For metrics.json: the curve used, the draft lengths chosen (a histogram, per kind and in
        all) and the acceptance estimates."""
        total: Counter = Counter()
        for counts in self.chosen.values():
            total.update(counts)
        return {"policy": "cost", "curve": self.costs.describe(),
                "lengths": {n: total[n] for n in sorted(total)},
                "lengths_by_kind": {str(k): {n: c[n] for n in sorted(c)} for k, c in self.chosen.items()},
                "proposed": {n: self.proposed[n] for n in sorted(self.proposed)},
                "acceptance": self.acceptance.describe()}
