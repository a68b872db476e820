"""Every bad value of a fixed config group is refused before work starts: one line, exit status 2.

The walk covers every numeric and choice field of `specsweep.app.schema` with values of the wrong type
and out of range, through the app's own entry point (`python -m specsweep`, run in this process: a
subprocess per value would cost seconds each); a few cases also go through a real subprocess."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from dataclasses import fields
from typing import get_type_hints

import pytest

from specsweep.app import schema

NUMERIC = (int, float)
# runpy runs `python -m specsweep` in this process, where the test already imported specsweep.__main__
pytestmark = pytest.mark.filterwarnings("ignore:.specsweep.__main__. found in sys.modules:RuntimeWarning")


def invalid_values(cls, f) -> list[str]:
    """Command-line values ``f`` of ``cls`` must refuse: wrong type, and each side of its range."""
    meta, kind = f.metadata, get_type_hints(cls)[f.name]
    if "choices" in meta:
        return ["bogus", "2"]
    base = next(t for t in NUMERIC if t is kind or t in getattr(kind, "__args__", ()))
    values = ["abc", "true"] + (["1.5"] if base is int else [])
    if "min" in meta:
        values.append(str(base(meta["min"]) - 1))
    if "above" in meta:
        values.append(str(base(meta["above"])))
    if "max" in meta:
        values.append(str(base(meta["max"]) + 1))
    return values


def checked_fields():
    groups = {**{g: (g + ".", c) for g, c in schema.GROUPS.items()}, "": ("", schema.TopLevel)}
    for prefix, cls in groups.values():
        for f in fields(cls):
            if f.metadata:
                yield from ((f"{prefix}{f.name}", value) for value in invalid_values(cls, f))


CASES = list(checked_fields())
# the config options that hold a key the defaults lack
OPTIONS = {"tree.k": ["tree=kary"], "tree.budget": ["tree=dynamic"], "hardware.max_verify_tokens": ["hardware=cpu-bf16"],
           "hardware.verify_width": ["hardware=cuda"], "logger.": ["logger=wandb"]}


def test_the_walk_covers_every_group_and_numeric_field():
    keys = {key for key, _ in CASES}
    assert {"decode.max_new_tokens", "decode.top_p", "dataset.limit", "dataset.offset", "tree.depth", "tree.budget",
            "hardware.threads", "hardware.max_verify_tokens", "evaluation.timeout_s", "seed", "evaluate",
            "logger.mode", "dataset.prompt_format"} <= keys
    for cls in (*schema.GROUPS.values(), schema.TopLevel):  # no int/float field escapes a range
        hints = get_type_hints(cls)
        for f in fields(cls):
            if hints[f.name] in NUMERIC or set(getattr(hints[f.name], "__args__", ())) & set(NUMERIC):
                assert f.metadata, f"{cls.__name__}.{f.name} has no range"


def run_app(monkeypatch, capsys, tmp_path, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["specsweep", *args, f"hydra.run.dir={tmp_path / 'run'}",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as exit_:  # `python -m specsweep`, in this process
        runpy.run_module("specsweep", run_name="__main__", alter_sys=True)
    return exit_.value.code, capsys.readouterr().err


def options_for(key: str) -> list[str]:
    return next((options for prefix, options in OPTIONS.items() if key.startswith(prefix)), [])


def test_every_bad_value_is_refused_by_the_schema_in_one_line():
    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from specsweep import CONF_DIR
    from specsweep.errors import SpecsweepError

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # one compose per option set
        base = {tuple(o): compose("config", overrides=o) for o in [[], *OPTIONS.values()]}
    for key, value in CASES:
        cfg = base[tuple(options_for(key))].copy()
        with open_dict(cfg):
            OmegaConf.update(cfg, key, yaml.safe_load(value))  # the value as the command line parses it
        with pytest.raises(SpecsweepError) as err:
            schema.check(cfg)
        assert str(err.value).startswith(f"{key}=") and "\n" not in str(err.value), (key, value, err.value)


FIRST_CASES = list({key: (key, value) for key, value in reversed(CASES)}.values())  # one bad value per field


@pytest.mark.parametrize("key, value", FIRST_CASES, ids=[f"{k}={v}" for k, v in FIRST_CASES])
def test_every_field_refuses_through_the_app_with_one_line_and_exit_2(monkeypatch, capsys, tmp_path, key, value):
    code, err = run_app(monkeypatch, capsys, tmp_path, *options_for(key), f"{key}={value}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"specsweep: error: {key}=") and "Traceback" not in err, err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_unknown_keys_and_offsets_past_the_dataset_are_refused(monkeypatch, capsys, tmp_path):
    code, err = run_app(monkeypatch, capsys, tmp_path, "+tree.dept=3")
    assert code == 2 and err.strip() == "specsweep: error: tree.dept: no such setting"
    code, err = run_app(monkeypatch, capsys, tmp_path, "dataset.offset=164")
    assert code == 2 and err.strip() == "specsweep: error: dataset.offset=164: past the end of humaneval (164 prompts)"


def test_good_values_pass_the_schema():
    from hydra import compose, initialize_config_dir

    from specsweep import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in ([], ["dataset.limit=1", "decode.top_p=0.5", "evaluate=false", "hardware.threads=2"],
                          ["experiment=best"], ["tree=medusa"], ["hardware=cpu-bf16", "hardware.row_block=16"]):
            schema.check(compose("config", overrides=overrides))


@pytest.mark.parametrize("args, line", [
    (["dataset.limit=-3"], "dataset.limit=-3: must be >= 1"),
    (["decode.max_new_tokens=abc"], "decode.max_new_tokens=abc: expected an integer"),
    (["-m", "draft=none,prompt-lookup", "dataset.offset=-1"], "dataset.offset=-1: must be >= 0"),  # before any job
])
def test_the_command_line_refuses_in_one_line(tmp_path, args, line):
    proc = subprocess.run([sys.executable, "-m", "specsweep", *args, f"hydra.run.dir={tmp_path / 'run'}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 2 and proc.stderr.strip() == f"specsweep: error: {line}", proc.stderr
    assert not (tmp_path / "sweep" / "0").exists()  # a multirun refused before its first job
