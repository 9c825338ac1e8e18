"""The benchmarks run as documented, `python benchmarks/X.py` from the repo root, and shadow no standard module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_no_benchmark_shadows_a_standard_module():
    assert SCRIPTS
    assert not [p.name for p in SCRIPTS if p.stem in sys.stdlib_module_names]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_help_runs_from_the_repo_root(script):
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script.name}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
