"""specsweep's default sweeper: Hydra's basic grid, where a swept key applies to the options that have it.

    python -m specsweep -m draft=speculator,medusa,prompt-lookup draft.heads=3,4,6

Prompt lookup has no ``draft.heads``. With Hydra's basic sweeper the whole sweep stops on composing
its first such job; here each of those jobs drops the override it has no key for, and the jobs
that become identical run once: 2 x 3 heads jobs and one prompt-lookup job. A key no job has is
refused in one line (exit 2); any other composition error stops the sweep as before. Everything else (batches, launchers,
the sweep directory) is the basic sweeper's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class GridSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.batches: list[list[list[str]]] | None = None

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        if self.batches is None:
            self.batches = self.applicable_batches()
        self.batch_index += 1
        return self.batches[self.batch_index - 1]

    def applicable_batches(self) -> list[list[list[str]]]:
        """Every batch's jobs with the overrides they have keys for, a job identical to an earlier
        one left out; a key no job has is refused in one line, exit 2."""
        batches, seen, dropped, kept = [], set(), {}, set()
        for batch in self.overrides:
            jobs = []
            for overrides in batch:
                applicable = self.applicable(list(overrides))
                for item in set(overrides) - set(applicable):
                    dropped.setdefault(item.split("=", 1)[0], []).append(item)
                kept.update(item.split("=", 1)[0] for item in applicable)
                if tuple(applicable) not in seen:
                    seen.add(tuple(applicable))
                    jobs.append(applicable)
            batches.append(jobs)
        for key, items in dropped.items():
            if key not in kept:
                print(f"specsweep: error: {items[0]}: no job of this sweep has the key {key}", file=sys.stderr)
                sys.exit(2)
            log.info("%s: left out of %d jobs whose choices have no such key (jobs then identical run once)",
                     key, len(items))
        return batches

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Nothing left to check: ``applicable`` composed every job of the batch."""

    def applicable(self, overrides: list[str]) -> list[str]:
        """``overrides`` less the value overrides whose key the job's composed config lacks; the
        result is composed once here (a job that still fails raises its own composition error)."""
        loader = self.hydra_context.config_loader
        try:
            loader.load_sweep_config(master_config=self.config, sweep_overrides=overrides)
            return overrides
        except ConfigCompositionException as err:
            error = err
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
        values = [i for i, o in enumerate(parsed)
                  if o.type is OverrideType.CHANGE and "." in o.key_or_group and not o.is_hydra_override()]
        try:
            base = loader.load_sweep_config(master_config=self.config,
                                            sweep_overrides=[s for i, s in enumerate(overrides) if i not in values])
        except ConfigCompositionException:
            raise error from None
        missing = {i for i in values if not _has(base, parsed[i].key_or_group)}
        if not missing:
            raise error
        kept = [s for i, s in enumerate(overrides) if i not in missing]
        loader.load_sweep_config(master_config=self.config, sweep_overrides=kept)
        return kept


def _has(config: DictConfig, key: str) -> bool:
    """Whether ``config`` has the dotted ``key`` (set or not: ``???`` counts)."""
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(config, parent, default=None) if parent else config
    return isinstance(node, DictConfig) and last in node.keys()
