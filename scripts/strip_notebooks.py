#!/usr/bin/env python3
"""Strip outputs from the notebooks (they are kept without outputs in git).

    python scripts/strip_notebooks.py            # strip notebooks/*.ipynb in place
    python scripts/strip_notebooks.py --check    # exit 1 and list the notebooks that need stripping
    python scripts/strip_notebooks.py a.ipynb …  # only these files

Removes cell outputs, execution counts, per-cell execution/collapse metadata and the saved widget
state; keeps cell ids, tags and the kernelspec. Needs only the standard library (works before the
virtual environment exists); the files are written as nbformat does (1-space indent, sorted keys).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELL_METADATA_DROP = ("execution", "collapsed", "scrolled", "jupyter", "ExecuteTime")
NOTEBOOK_METADATA_DROP = ("widgets", "toc", "varInspector")


def strip(nb: dict) -> dict:
    """The notebook without outputs (a new dict; the input is left alone)."""
    nb = json.loads(json.dumps(nb))
    for key in NOTEBOOK_METADATA_DROP:
        nb.get("metadata", {}).pop(key, None)
    for cell in nb.get("cells", []):
        for key in CELL_METADATA_DROP:
            cell.get("metadata", {}).pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def is_stripped(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    return text == dumps(strip(json.loads(text)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if any needs stripping")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    dirty = [p for p in paths if not is_stripped(p)]
    for p in dirty:
        if args.check:
            print(f"not stripped: {p}")
        else:
            p.write_text(dumps(strip(json.loads(p.read_text(encoding="utf-8")))), encoding="utf-8")
            print(f"stripped: {p}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
