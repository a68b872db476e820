"""Writes data/code_prompts.jsonl: code prompts that are not HumanEval, for benchmarks.

Each prompt is a function's signature and docstring from this interpreter's standard library (as a
HumanEval problem is a signature and docstring), the body left to the model. Functions are taken in
a fixed order from a fixed list of modules, so the file is the same on every machine with the same
Python minor version. Alternate functions form the tuning and the held-out split; the file holds the
tuning split first: tune on `--offset 0 --limit T`, report on `--offset T` (T printed below).

    python scripts/make_code_prompts.py [--per-module 4] [--out data/code_prompts.jsonl]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from pathlib import Path

MODULES = ("textwrap", "shlex", "statistics", "heapq", "bisect", "fnmatch", "posixpath", "difflib", "calendar",
           "colorsys", "base64", "html", "ipaddress", "fractions", "glob", "tokenize", "csv", "json.encoder",
           "urllib.parse", "shutil", "random", "email.utils", "pprint", "gettext", "zipfile", "tarfile")


def prompts(per_module: int) -> list[dict]:
    rows = []
    for name in MODULES:
        module = importlib.import_module(name)
        taken = 0
        for attr, fn in sorted(vars(module).items()):
            if taken == per_module or attr.startswith("_") or not inspect.isfunction(fn):
                continue
            doc = inspect.getdoc(fn)
            if fn.__module__ != module.__name__ or not doc or len(doc) < 80:
                continue
            try:
                signature = str(inspect.signature(fn))
            except (TypeError, ValueError):
                continue
            body = "\n".join(("    " + line).rstrip() for line in doc.splitlines())
            rows.append({"task_id": f"{name}.{attr}", "prompt": f'def {attr}{signature}:\n    """\n{body}\n    """\n'})
            taken += 1
    for i, row in enumerate(rows):  # alternate, so both splits draw on every module
        row["split"] = "tuning" if i % 2 == 0 else "held-out"
    return sorted(rows, key=lambda row: row["split"] != "tuning")  # stable: tuning first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-module", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "code_prompts.jsonl")
    args = parser.parse_args()
    rows = prompts(args.per_module)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} prompts ({sum(r['split'] == 'tuning' for r in rows)} tuning) from Python "
          f"{sys.version.split()[0]} -> {args.out}")


if __name__ == "__main__":
    main()
