"""The documentation in docs/ builds without a warning (`mkdocs build --strict`), and every page the
nav names exists."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs / mkdocstrings not installed (pip install '.[docs]')",
)


@needs_mkdocs
def test_docs_build_strict(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("particles.simulate.simulate", "analysis.clusters.count_clusters",
                 "analysis.sinks.sink_rate",
                 "particles.nn.checkpoint.load_checkpoint",
                 "particles.geometry.Sphere", "particles.params.PARAMS", "particles.params.check",
                 "particles.fields.ALiBiCausal"):
        assert f'id="{name}"' in api, f"the API reference lacks {name}"


def test_nav_pages_exist():
    import re

    nav = re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert {"index.md", "maths.md", "contract.md", "metrics.md", "bridge.md", "api.md"} <= set(nav)
    missing = [page for page in nav if not (ROOT / "docs" / page).is_file()]
    assert not missing, f"mkdocs.yml names missing pages: {missing}"


#: documents outside the repository that nothing in it may cite (split so this file does not match)
OUTSIDE = ("design" + ".md", "shared" + "/")


def test_no_tracked_file_cites_documents_outside_the_repository():
    """Every tracked file (code, docs, notebooks, README, data) is searched; none is excluded."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                                timeout=60)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    hits = []
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for pattern in OUTSIDE:
            for lineno, line in enumerate(text.splitlines(), 1):
                if pattern in line:
                    hits.append(f"{name}:{lineno}: {line.strip()[:100]}")
    assert not hits, "cite docs/ pages instead:\n" + "\n".join(hits)
