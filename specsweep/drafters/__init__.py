"""Drafts by config: a draft is one `Drafter` subclass plus one YAML in ``conf/draft/``.

The YAML names its class with ``_target_`` and holds every default; its other keys are the class's
``build`` keywords (by default its constructor's), except ``name`` (results and choices) and
``length_policy`` (the engine's). ``_target_: null`` is the autoregressive baseline (``draft=none``).
Before anything loads, the app reads the class attributes (`hydra.utils.get_class`): ``fills``
(the draft shapes it can fill) and ``model_paths`` (config keys holding model dirs to resolve).
A sub-config with a ``_target_`` is a draft itself when its class is a `Drafter` (a cascade's
levels: checked and resolved the same way, built by the outer class through `build_drafter`), or
else a part the class builds with `build_part` (prompt lookup's ``recycling`` and ``datastore``);
a part class may declare ``fills`` too, narrowing the draft's.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from specsweep.backends.hardware import Hardware
from specsweep.core.draft import Draft, Drafter
from specsweep.core.sampling import Sampling
from specsweep.core.tree import DynamicTreeSpec, SelfShaped, StepShape, Tree
from specsweep.errors import SpecsweepError

APP_KEYS = ("_target_", "name", "length_policy")  # a draft config's keys that are not the class's
SHAPES = {"chain": "chains", "tree": "trees", "dynamic": "dynamic trees", "self": "steps it shapes itself"}


@dataclass
class BuildContext:
    """What a drafter may need from the run: the target, its tokenizer, decode settings, devices."""

    target: torch.nn.Module
    tokenizer: object
    sampling: Sampling
    generator: torch.Generator
    hardware: Hardware
    load_model: Callable[[str], torch.nn.Module]  # config setting (e.g. "draft.path") -> the loaded draft model
    cache_dir: Path
    prefix: str = "draft"  # where the config being built sits (draft.levels.0 for a cascade's first level)

    def model(self, key: str) -> torch.nn.Module:
        """The loaded model of this config's ``key`` (one of the class's ``model_paths``)."""
        return self.load_model(f"{self.prefix}.{key}")

    def at(self, prefix: str) -> BuildContext:
        return replace(self, prefix=prefix)


def _target(cfg, prefix: str) -> str | None:
    if not isinstance(cfg, Mapping) or "_target_" not in cfg:
        raise SpecsweepError(f"{prefix}: no _target_ (the class it configures, e.g. "
                             "specsweep.drafters.model.ModelDrafter; null for no draft)")
    return cfg["_target_"]


def _locate(path: str, setting: str) -> type:
    hydra_log = logging.getLogger("hydra.utils")  # get_class logs its failure as an error of its own
    quiet, hydra_log.disabled = hydra_log.disabled, True
    try:
        return get_class(path)
    except Exception:  # noqa: BLE001 (Hydra wraps what went wrong in its own errors)
        raise SpecsweepError(f"{setting}={path}: no such class") from None
    finally:
        hydra_log.disabled = quiet


def draft_class(cfg, prefix: str = "draft") -> type[Drafter] | None:
    """The class a draft config's ``_target_`` names; None for ``_target_: null`` (no draft)."""
    path = _target(cfg, prefix)
    if path is None:
        return None
    cls = _locate(path, f"{prefix}._target_")
    if not issubclass(cls, Drafter):
        raise SpecsweepError(f"{prefix}._target_={path}: not a draft (a subclass of specsweep.core.draft.Drafter)")
    return cls


def _items(cfg):
    """A config's (key, value) pairs as plain containers, interpolations and ``???`` left as they are."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    return [(key, value) for key, value in cfg.items() if key not in APP_KEYS]


def _is_draft(value, setting: str) -> bool:
    """A sub-config that is a draft of its own (a cascade level), not a part."""
    if not isinstance(value, Mapping) or "_target_" not in value:
        return False
    return value["_target_"] is None or issubclass(_locate(value["_target_"], f"{setting}._target_"), Drafter)


def _nested_drafts(cfg, prefix: str):
    """(setting, config) of every draft inside a draft config, at a key or in a list."""
    for key, value in _items(cfg):
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            setting = f"{prefix}.{key}" + ("" if index is None else f".{index}")
            if _is_draft(item, setting):
                yield setting, item


def _parts(cfg, prefix: str):
    """(setting, class) of every part sub-config (a ``_target_`` that is not a draft)."""
    for key, value in _items(cfg):
        setting = f"{prefix}.{key}"
        if isinstance(value, Mapping) and value.get("_target_") and not _is_draft(value, setting):
            yield setting, _locate(value["_target_"], f"{setting}._target_")


def _check_keys(cls: type[Drafter], params: dict, prefix: str) -> None:
    """The config's keys against what the class takes: ``build``'s keywords where it names them,
    else (a ``build`` that passes ``**params`` on, or the default one) the constructor's."""
    build = inspect.signature(cls.build)
    named = not any(p.kind is p.VAR_KEYWORD for p in build.parameters.values())
    try:
        build.bind(None, **params) if named else inspect.signature(cls).bind(**params)
    except TypeError as err:  # a key the class does not take, or one it needs that the YAML lacks
        raise SpecsweepError(f"{prefix} ({cls.__name__}): {err}") from None


def shape_kind(shape: StepShape) -> str:
    if isinstance(shape, SelfShaped):
        return "self"
    if isinstance(shape, DynamicTreeSpec):
        return "dynamic"
    return "chain" if shape.is_chain else "tree"


def step_shape(cfg, tree: Tree | DynamicTreeSpec) -> StepShape:
    """The draft shape of every step: the ``tree=`` shape, or the steps a draft that shapes them
    itself (Jacobi, lookahead) says it sends; such a draft takes the default ``tree=chain`` only
    (a sweep over trees for it would repeat one run under other names)."""
    cls = draft_class(cfg)
    if cls is None or "self" not in cls.fills:
        return tree
    name = cfg.get("name") or cls.__name__
    if not (isinstance(tree, Tree) and tree.is_chain):
        raise SpecsweepError(f"draft={name} shapes every step itself (its own draft.* keys): leave tree=chain")
    params = dict(_items(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg))
    _check_keys(cls, params, "draft")
    try:
        return cls.self_shaped(params)
    except ValueError as err:
        raise SpecsweepError(f"draft: {err}") from None


def check_draft(cfg, shape: StepShape) -> None:
    """Refuse, before anything is loaded, a draft config whose class (or a cascade level's) is
    unknown or takes other keys, and a draft/tree pairing the draft cannot fill."""
    cls = draft_class(cfg)
    if cls is None:  # autoregressive: nothing to fill
        return
    _check_all_keys(cfg, "draft")
    need = shape_kind(shape)
    if need not in cls.fills:
        raise SpecsweepError(f"draft={cfg.get('name') or cls.__name__} ({cls.__name__}) cannot fill {SHAPES[need]}, "
                             f"only {' and '.join(SHAPES[f] for f in cls.fills)}"
                             + (": use tree=chain" if "chain" in cls.fills else ""))
    for setting, part in _parts(cfg, "draft"):
        fills = getattr(part, "fills", None)
        if fills is not None and need not in fills:
            raise SpecsweepError(f"{setting} ({part.__name__}) fills {' and '.join(SHAPES[f] for f in fills)} "
                                 f"only: use tree=chain, or {setting}=null")


def _check_all_keys(cfg, prefix: str) -> None:
    cls = draft_class(cfg, prefix)
    if cls is not None:
        _check_keys(cls, dict(_items(cfg)), prefix)
    for inner, level in _nested_drafts(cfg, prefix):
        _check_all_keys(level, inner)


def model_paths(cfg, prefix: str = "draft") -> dict[str, str]:
    """Every model a draft config needs, as {setting: path}, so paths are checked before any loading."""
    cls = draft_class(cfg, prefix)
    if cls is None:
        return {}
    missing = [key for key in cls.model_paths if key not in cfg]
    if missing:
        raise SpecsweepError(f"{prefix}.{missing[0]}: not set ({cls.__name__} needs a model dir or hub id there)")
    paths = {f"{prefix}.{key}": cfg[key] for key in cls.model_paths}
    for inner, level in _nested_drafts(cfg, prefix):
        paths.update(model_paths(level, inner))
    return paths


def build_drafter(cfg, ctx: BuildContext, prefix: str = "draft") -> Drafter | None:
    """The drafter of a draft config (None for ``_target_: null``), built by its class's ``build``."""
    cls = draft_class(cfg, prefix)
    if cls is None:
        return None
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    params = {key: value for key, value in cfg.items() if key not in APP_KEYS}
    _check_keys(cls, params, prefix)
    try:
        return cls.build(ctx.at(prefix), **params)
    except ValueError as err:  # constructor argument checks
        raise SpecsweepError(f"{prefix}: {err}") from None


def build_part(cfg, ctx: BuildContext, key: str):
    """A part of a draft from its sub-config at ``key`` (``{_target_: ..., ...}``; None = off),
    instantiated by Hydra."""
    if cfg is None:
        return None
    setting = f"{ctx.prefix}.{key}"
    _locate(_target(cfg, setting), f"{setting}._target_")
    try:
        return instantiate(cfg, _convert_="all")
    except Exception as err:  # noqa: BLE001 (Hydra wraps the constructor's error)
        cause = err.__cause__ if err.__cause__ is not None else err
        if isinstance(cause, SpecsweepError):
            raise cause from None
        raise SpecsweepError(f"{setting}: {cause}") from None


__all__ = ["BuildContext", "Draft", "Drafter", "build_drafter", "build_part", "check_draft", "draft_class",
           "model_paths"]
