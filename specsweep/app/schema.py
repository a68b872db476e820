"""Typed schemas of the fixed config groups: every type, range and choice error comes from here.

Each group (decode, dataset, tree, hardware, logger, target, evaluation) and the top-level keys are a
dataclass registered in Hydra's ConfigStore (``schema/<group>``); a field's metadata holds its range
(``min``, ``max``, ``above``) or its ``choices``. `check(cfg)` merges the composed config onto the
schemas with OmegaConf (which refuses wrong types and unknown keys) and then checks the ranges, before
anything is loaded: a bad value is one SpecsweepError line naming the key. Drafts are free-form per
class (`_target_` + its constructor's keys; `specsweep.drafters` checks them), so they have no schema.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from specsweep.errors import SpecsweepError


def num(default, **bounds):
    """A numeric field with bounds: min / max (inclusive), above (exclusive)."""
    return field(default=default, metadata=bounds)


def one_of(default, *choices):
    return field(default=default, metadata={"choices": choices})


@dataclass
class Decode:
    temperature: float = num(0.0, min=0.0)
    top_k: int = num(1, min=0)
    top_p: float = num(1.0, above=0.0, max=1.0)
    max_new_tokens: int = num(200, min=1)


@dataclass
class Dataset:
    name: str = one_of("humaneval", "humaneval", "jsonl")
    path: Optional[str] = None
    limit: Optional[int] = num(None, min=1)
    offset: int = num(0, min=0)  # past the dataset's end: refused when the prompts are read
    prompt_format: str = one_of("plain", "plain", "chat")


@dataclass
class TreeShape:
    name: str = "chain"
    shape: str = one_of("chain", "chain", "binary", "kary", "medusa", "custom", "dynamic")
    depth: Optional[int] = num(None, min=1)
    k: Optional[int] = num(None, min=1)
    budget: Optional[int] = num(None, min=1)
    paths: Optional[list] = None
    path_file: Optional[str] = None


@dataclass
class Hardware:
    name: str = "auto"
    device: str = "auto"  # auto, cpu, cuda, cuda:N, npu: hardware.resolve checks it against the machine
    dtype: str = one_of("auto", "auto", "float32", "bfloat16", "float16")
    attn_implementation: str = "sdpa"  # any of transformers' attention functions, or row_invariant
    threads: Optional[int] = num(None, min=1)
    tree_mask: str = one_of("additive", "additive", "bool")
    max_verify_tokens: Optional[int] = num(None, min=1)
    prepack_linear: bool = False
    row_block: Any = "auto"  # auto or a positive integer: hardware.resolve checks it
    lean_forward: bool = False
    exactness_probe: bool = False
    cuda_graphs: bool = False
    verify_width: Optional[int] = num(None, min=1)
    compile: bool = False


@dataclass
class Logger:
    name: str = one_of("none", "none", "wandb")
    mode: str = one_of("offline", "offline", "online", "disabled")
    project: str = "specsweep"
    entity: Optional[str] = None
    dir: Optional[str] = None


@dataclass
class Target:
    name: str = "local"
    path: str = "???"


@dataclass
class Evaluation:
    timeout_s: float = num(5.0, above=0.0)
    memory_mb: int = num(512, min=64)
    workers: int = num(2, min=1)


@dataclass
class TopLevel:
    """The scalar top-level keys (experiments add their own blocks: `search`, `bench`, ...)."""

    job: str = "specsweep.app.run.run_decode"
    seed: int = num(0, min=0)
    repeats: int = num(1, min=1)  # decode every prompt this many times (specsweep.app.uncertainty.schedule)
    cache_dir: str = "~/.cache/specsweep"
    download: bool = False
    evaluate: Any = one_of("auto", "auto", True, False)


GROUPS = {"decode": Decode, "dataset": Dataset, "tree": TreeShape, "hardware": Hardware, "logger": Logger,
          "target": Target, "evaluation": Evaluation}

_store = ConfigStore.instance()
for _group, _schema in {**GROUPS, "top": TopLevel}.items():
    _store.store(group="schema", name=_group, node=_schema)


def _merge(schema, node: DictConfig, prefix: str) -> None:
    """OmegaConf's own type and key checks of ``node`` against ``schema``, as one line."""
    try:
        OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as err:
        key = f"{prefix}{err.key}" if err.key is not None else prefix.rstrip(".")
        if "not in" in str(err) or "Key" in type(err).__name__:
            raise SpecsweepError(f"{key}: no such setting") from None
        expected = getattr(schema.__dataclass_fields__.get(str(err.key)), "type", "another type")
        raise SpecsweepError(f"{key}={_show(OmegaConf.select(node, str(err.key)))}: expected "
                             f"{_type_name(expected)}") from None


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("Optional[", "").rstrip("]")
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(text, text)


def _show(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _check_range(key: str, value, meta: dict) -> None:
    if "choices" in meta:
        if value not in meta["choices"] or isinstance(value, bool) != any(isinstance(c, bool) and c == value
                                                                         for c in meta["choices"]):
            raise SpecsweepError(f"{key}={_show(value)}: choose one of {', '.join(map(_show, meta['choices']))}")
        return
    if value is None:
        return
    if "min" in meta and value < meta["min"]:
        raise SpecsweepError(f"{key}={_show(value)}: must be >= {meta['min']}")
    if "above" in meta and value <= meta["above"]:
        raise SpecsweepError(f"{key}={_show(value)}: must be > {meta['above']}")
    if "max" in meta and value > meta["max"]:
        raise SpecsweepError(f"{key}={_show(value)}: must be <= {meta['max']}")


def check_node(schema, node: DictConfig, prefix: str) -> None:
    """``node`` (a group's config, or the top level) against ``schema``: types, keys, then ranges."""
    names = {f.name for f in fields(schema)}
    own = OmegaConf.masked_copy(node, [k for k in node if k in names]) if prefix == "" else node
    _merge(schema, own, prefix)
    for f in fields(schema):
        if f.name in node and f.metadata:
            value = OmegaConf.select(node, f.name, throw_on_missing=False)
            if isinstance(value, str) and "choices" not in f.metadata:  # '5' from YAML: OmegaConf took it
                value = float(value) if "float" in str(f.type) else int(value)
            _check_range(f"{prefix}{f.name}", value, f.metadata)


def check(cfg: DictConfig) -> None:
    """Every fixed group present in ``cfg`` and the top-level keys, refused in one line where bad."""
    for group, schema in GROUPS.items():
        if isinstance(cfg.get(group), DictConfig):
            check_node(schema, cfg[group], f"{group}.")
    check_node(TopLevel, cfg, "")


class RefuseBadValues(Callback):
    """A multirun's values that are not swept are checked once, before the first job starts (swept
    ones fail their own jobs, each with its line in error.json and the sweep summary)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            check(config)
        except SpecsweepError as err:
            print(f"specsweep: error: {err}", file=sys.stderr)
            sys.exit(2)
