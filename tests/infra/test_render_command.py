"""`gemma-unified render-k8s` as a command: stdout for kubectl, files with --out, exit 2 on a bad spec."""

from __future__ import annotations

import typer
import yaml
from infra_paths import EXAMPLES
from typer.testing import CliRunner

runner = CliRunner()


def _app() -> typer.Typer:
    from jobs.cli.deploy import render_k8s

    app = typer.Typer()
    app.command()(render_k8s)
    return app


def test_stdout_is_ready_for_kubectl_apply_without_the_secret_template():
    result = runner.invoke(
        _app(), [str(EXAMPLES / "serve.yaml"), "--image", "r.example.com/cpu:1", "--gpu-image", "r.example.com/gpu:1"]
    )
    assert result.exit_code == 0, result.output
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in documents] == ["RayService"]
    text = yaml.safe_dump(documents)
    assert "r.example.com/cpu:1" in text and "r.example.com/gpu:1" in text


def test_out_writes_kubernetes_and_vm_files(tmp_path):
    result = runner.invoke(_app(), ["--job", str(EXAMPLES / "job.yaml"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "k8s/rayjob-job.yaml",
        "k8s/templates/storage-secret.yaml",
        "vm/cluster.yaml",
        "vm/storage.env.example",
    ]
    cluster = yaml.safe_load((tmp_path / "vm" / "cluster.yaml").read_text())
    assert "/etc/gemma-unified/serve-config.yaml" not in cluster["file_mounts"]  # no endpoint, no Serve config


def test_bad_specs_exit_2_with_the_reason(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("auth:\n  api_keys: [sk-live]\n")
    result = runner.invoke(_app(), [str(bad)])
    assert result.exit_code == 2
    assert "clear text" in result.output
    result = runner.invoke(_app(), [])
    assert result.exit_code == 2 and "nothing to render" in result.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "job.yaml").write_text((EXAMPLES / "job.yaml").read_text())
    result = runner.invoke(_app(), ["--job", str(EXAMPLES / "job.yaml"), "--job", str(tmp_path / "other" / "job.yaml")])
    assert result.exit_code == 2 and "distinct names" in result.output
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("head: {cpus: 0, memory: 1Gi}\n")
    result = runner.invoke(_app(), [str(bad), "--cluster", str(cluster)])
    assert result.exit_code == 2 and "head.cpus" in result.output
