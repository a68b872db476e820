"""Resume a decode job at its next sample.

A job writes run.json (its resolved config, code commit and lock, and one record per process start)
before it decodes, and samples.jsonl after every sample. A job that finds both in its run dir, written
under the same config, commit and lock, keeps the finished samples (with their own timings, so the
run's rates stay sums over samples) and decodes from the next one; under another config, commit or lock
it starts afresh and says why in one line. A torn last line (a process killed mid-write by something
that bypassed the atomic rewrite) is dropped.

Drafts that learn across prompts (token recycling's table, the cost policy's curve) start learning
again at the resumed sample: outputs are the same (lossless), later samples' acceptance may differ.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from specsweep.app.results import SAMPLES, write_json, write_jsonl
from specsweep.core.engine import SampleStats

log = logging.getLogger(__name__)
RUN = "run.json"


@dataclass
class Resume:
    """What a start continues from: the finished samples kept, and every start so far (this one last)."""

    samples: list[dict] = field(default_factory=list)
    starts: list[dict] = field(default_factory=list)
    why_afresh: str | None = None  # set when earlier samples were found but not kept

    @property
    def start(self) -> int:
        """This start's index in ``starts`` (each sample records the start that decoded it)."""
        return len(self.starts) - 1

    def record(self) -> dict:
        """metrics.json's ``resume``: samples taken over from earlier starts, and every start."""
        per_start = [sum(s.get("start", 0) == i for s in self.samples) for i in range(len(self.starts))]
        return {"resumed_samples": self.starts[-1]["resumed_samples"], "starts": self.starts,
                "samples_per_start": per_start, "started_afresh_because": self.why_afresh}


def read_samples(path: Path) -> tuple[list[dict], bool]:
    """The samples of a samples.jsonl up to its first line that is not a whole JSON object, and
    whether such a (torn) line was dropped."""
    samples = []
    try:
        lines = path.read_text(errors="replace").split("\n")
    except OSError:
        return [], False
    for line in lines:
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError:
            return samples, True
        if not isinstance(sample, dict):
            return samples, True
        samples.append(sample)
    return samples, False


def first_difference(old, new, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two resolved configs, as `key: old -> new`."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}"


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def why_not_resumed(old: dict, key: dict) -> str | None:
    """None where an earlier start's run.json has this job's key, else the difference in a few words."""
    if old.get("git_commit") != key["git_commit"]:
        return f"the code differs (commit {old.get('git_commit')} -> {key['git_commit']})"
    if old.get("lock_sha256") != key["lock_sha256"]:
        return "the locked environment differs (requirements.lock changed)"
    diff = first_difference(old.get("config"), key["config"])
    return f"the config differs ({diff})" if diff else None


def this_start(resumed: int) -> dict:
    env = os.environ
    return {"started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "pid": os.getpid(), "slurm_job_id": env.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT", 0)), "resumed_samples": resumed}


def begin(run_dir: Path, key: dict, prompts: list[dict]) -> Resume:
    """Read what earlier starts left in ``run_dir``, keep what this job may keep, and write run.json
    with this start added. ``key``: {config, git_commit, lock_sha256}."""
    run_file, samples_file = run_dir / RUN, run_dir / SAMPLES
    resume = Resume()
    try:
        old = json.loads(run_file.read_text())
    except (OSError, json.JSONDecodeError):
        old = None
    samples, torn = read_samples(samples_file)
    if samples:
        resume.why_afresh = why_not_resumed(old, key) if old else "no run.json says what wrote it"
    if resume.why_afresh is None:
        # keep the samples that are this job's prompts, in order (never more than it has)
        for sample, prompt in zip(samples, prompts):
            if sample.get("task_id") != prompt["task_id"]:
                break
            resume.samples.append(sample)
        resume.starts = list(old.get("starts", [])) if old else []
        if torn:
            log.warning("%s: dropped a torn last line after %d whole samples", samples_file, len(samples))
        if samples_file.exists() and (torn or len(resume.samples) < len(samples)):
            write_jsonl(samples_file, resume.samples)  # the file holds exactly what is kept
    else:  # set aside, never deleted: the next sample's write would replace it
        os.replace(samples_file, samples_file.with_name(SAMPLES + ".replaced"))
        log.warning("%s holds %d samples but %s: starting afresh (they are in %s.replaced)", samples_file,
                    len(samples), resume.why_afresh, SAMPLES)
    if resume.samples:
        log.info("resuming at sample %d of %d: %d finished samples in %s", len(resume.samples) + 1, len(prompts),
                 len(resume.samples), samples_file)
    resume.starts.append(this_start(len(resume.samples)))
    write_json(run_file, {**key, "starts": resume.starts})
    return resume


def stats_of(sample: dict) -> SampleStats:
    """A finished sample's counters and timings as the engine measured them."""
    return SampleStats(**{f.name: sample[f.name] for f in fields(SampleStats) if f.name in sample})
