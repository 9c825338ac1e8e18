"""The arrows between the three packages point one way: `jobs -> pipelines`, `serving -> pipelines`, and
`jobs/cli -> serving` (the command line is the composition root). Read from the source with `ast`: no imports run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imported(source: str, package: str) -> set[str]:
    """Top-level package of every module a file of `package` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.add(package)  # a relative import stays inside its own package
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value).split(".")[0])
    return found


def _sources(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    return files


def _offenders(files: list[Path], forbidden: set[str]) -> list[str]:
    found = []
    for path in files:
        bad = _imported(path.read_text(), path.relative_to(REPO).parts[0]) & forbidden
        if bad:
            found.append(f"{path.relative_to(REPO)} imports {', '.join(sorted(bad))}")
    return found


def test_pipelines_imports_neither_serving_nor_jobs():
    assert _offenders(_sources("pipelines"), {"serving", "jobs"}) == []


def test_serving_does_not_import_jobs():
    assert _offenders(_sources("serving"), {"jobs"}) == []


def test_only_the_command_line_in_jobs_imports_serving():
    cli = REPO / "jobs" / "cli"
    outside = [path for path in _sources("jobs") if cli not in path.parents]
    assert outside and len(outside) < len(_sources("jobs"))
    assert _offenders(outside, {"serving"}) == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import serving.app\n", {"serving"}),
        ("def f():\n    from jobs.cli import app\n", {"jobs"}),
        ("import importlib\nimportlib.import_module('serving.spec')\n", {"importlib", "serving"}),
        ("from . import stages\n", {"pipelines"}),
    ],
)
def test_the_check_sees_every_kind_of_import(source, expected):
    assert _imported(source, "pipelines") == expected
