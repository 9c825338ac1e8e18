"""benchmarks/gpu_check.py --dry-run: every section of the GPU check runs on CPU and its table has every row.

The dry run takes the same code path as the GPU run (preset config, random checkpoint, our transformers engine,
float8 cast, image and audio prompts, speculation), with 2 layers and tiny widths. It must not import what the GPU
machine does not have (Ray, vLLM, pyarrow, the endpoint's web stack).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# Run as the README documents (`python benchmarks/gpu_check.py`), then list the heavy modules that got imported.
RUNNER = """
import runpy, sys
sys.argv = ["benchmarks/gpu_check.py", "--dry-run", "--hbm-gbps", "100"]
code = 0
try:
    runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = ("ray", "vllm", "pyarrow", "pandas", "fastapi", "s3fs", "typer", "rich")
print("HEAVY MODULES:", sorted(m for m in heavy if m in sys.modules))
sys.exit(code)
"""

ROWS = [
    ("setup", "device"),
    ("setup", "versions"),
    ("setup", "checkpoint written"),
    ("setup", "total time"),
    ("bf16", "parameters"),
    ("bf16", "weight bytes"),
    ("bf16", "weight bytes read per decode step"),
    ("bf16", "HBM bandwidth"),
    ("bf16", "prefill, 1 x 64 tokens"),
    ("bf16", "decode, batch 1"),
    ("bf16", "decode, batch 8"),
    ("bf16", "decode, batch 32"),
    ("fp8", "memory cap"),
    ("fp8", "weights"),
    ("fp8", "largest relative weight error of the cast"),
    ("fp8", "engine load + cast + to device"),
    ("fp8", "image prompt"),
    ("fp8", "audio prompt"),
    ("fp8", "peak GPU memory (allocated)"),
    ("plan", "model"),
    ("plan", "weights + assistant"),
    ("plan", "overhead (context, activations, logits)"),
    ("plan", "total before KV cache"),
    ("speculation", "image prompt"),
    ("speculation", "audio prompt"),
    ("speculation", "greedy output on vs off"),
    ("speculation", "drafted / accepted"),
    ("speculation", "tokens/s on vs off"),
]


def table(stdout: str) -> dict[tuple[str, str], str]:
    rows = {}
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split(" | ")]
        if len(parts) == 3 and parts[0] != "section":
            rows[(parts[0], parts[1])] = parts[2]
    return rows


@pytest.fixture(scope="module")
def dry_run():
    return subprocess.run([sys.executable, "-c", RUNNER], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_dry_run_prints_every_row(dry_run):
    assert dry_run.returncode == 0, dry_run.stdout[-3000:] + dry_run.stderr[-3000:]
    rows = table(dry_run.stdout)
    missing = [row for row in ROWS if row not in rows]
    assert not missing, dry_run.stdout[-4000:]
    assert not [row for row, value in rows.items() if "skipped" in value or row[0] == "error"], dry_run.stdout
    # The bound is computed when the bandwidth is known; every batch size reports one.
    for batch in (1, 8, 32):
        assert "bound" in rows[("bf16", f"decode, batch {batch}")]
    # A per-tensor e4m3 cast of normal(0, 0.02) weights loses a few percent, not more.
    assert float(rows[("fp8", "largest relative weight error of the cast")].rstrip("%")) < 10
    assert "266 image" in rows[("fp8", "image prompt")]
    assert " audio)" in rows[("fp8", "audio prompt")] and "(0 image, 0 audio)" not in rows[("fp8", "audio prompt")]
    assert "identical" == rows[("speculation", "greedy output on vs off")]
    drafted, accepted = rows[("speculation", "drafted / accepted")].split(" (")[0].split(" / ")
    assert int(drafted) > 0 and 0 <= int(accepted) <= int(drafted)


def test_dry_run_imports_nothing_the_gpu_machine_lacks(dry_run):
    assert "HEAVY MODULES: []" in dry_run.stdout, dry_run.stdout[-2000:]


def test_a_missing_package_fails_early_with_one_line(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setitem(gpu_check.REQUIRED, "no_such_module_here", "no-such-dist")
    assert gpu_check.main(["--dry-run"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["gpu_check: missing Python packages: no-such-dist (README, 'GPU check', brings them)"]


def test_out_of_time_sections_are_skipped_with_a_note_and_the_table_still_prints():
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--time-budget", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table(result.stdout)
    for row in [
        ("bf16", "prefill, 1 x 64 tokens"),
        ("bf16", "decode, batch 1"),
        ("bf16", "decode, batch 32"),
        ("fp8", "engine, image and audio prompts"),
        ("speculation", "on vs off"),
    ]:
        assert rows[row] == "skipped: time", result.stdout
    assert rows[("setup", "total time")].endswith("(budget 1 s)")
