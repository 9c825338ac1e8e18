"""ServeSpec: YAML loading, overrides, bounds, and what it turns into for Ray Serve."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config import EngineSpec, ModelSpec, SpecError
from serving.spec import ServeSpec, build_spec, load_spec


def test_defaults_are_valid_and_share_the_batch_classes():
    spec = ServeSpec()
    assert isinstance(spec.model, ModelSpec) and isinstance(spec.engine, EngineSpec)
    assert spec.http.port == 8000
    assert spec.model_id == "tiny"


def test_every_field_has_a_description():
    def walk(model_cls):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{model_cls.__name__}.{name} has no description"
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
                walk(field.annotation)

    walk(ServeSpec)


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "gemma-4-12b-it"},
                "autoscaling": {"model": {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 4}},
                "http": {"port": 9000},
            }
        )
    )
    spec = load_spec(path, {"model": {"name": "tiny"}, "http": {"port": None}})
    assert spec.model.name == "tiny"
    assert spec.http.port == 9000
    assert spec.autoscaling.model.serve_config()["max_replicas"] == 6
    assert "max_ongoing_requests" not in spec.autoscaling.model.serve_config()


@pytest.mark.parametrize(
    "data, field",
    [
        ({"http": {"port": 70000}}, "http.port"),
        ({"autoscaling": {"model": {"min_replicas": 3, "max_replicas": 2}}}, "autoscaling.model"),
        ({"autoscaling": {"model": {"max_ongoing_requests": 2}}, "batching": {"max_batch_size": 8}}, "max_ongoing"),
        ({"limits": {"max_body_bytes": 10}}, "limits.max_body_bytes"),
        ({"media": {"max_soft_tokens": 100}}, "media.max_soft_tokens"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_values_are_refused_naming_the_field(data, field):
    with pytest.raises(SpecError, match=field.split(".")[0]):
        build_spec(data)


def test_unreadable_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(path)


def test_app_builder_rejects_unknown_args():
    from serving.app import app_builder

    with pytest.raises(ValueError, match="unknown application args"):
        app_builder({"confg": "x.yaml"})


EXAMPLES = Path(__file__).resolve().parents[2] / "serving" / "examples"


def test_example_spec_and_serve_config_are_valid():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import app_builder

    spec = load_spec(EXAMPLES / "serve.yaml")
    assert spec.engine.kind == "vllm" and spec.autoscaling.model.max_replicas == 8
    config = ServeDeploySchema.model_validate(yaml.safe_load((EXAMPLES / "serve_config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "serving.app:app_builder"
    args = dict(application.args, config=str(EXAMPLES / "serve.yaml"))
    assert type(app_builder(args)).__name__ == "Application"


def test_cli_reports_a_bad_spec_without_starting_anything(tmp_path):
    import typer
    from typer.testing import CliRunner

    from jobs.cli.serve import serve_command

    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("other")(lambda: None)  # more than one command, as in the real CLI
    path = tmp_path / "serve.yaml"
    path.write_text("limits: {max_output_tokens: 0}\n")
    result = CliRunner().invoke(app, ["serve", str(path), "--port", "9000"])
    assert result.exit_code == 2
    assert "limits.max_output_tokens" in result.output


def test_batch_storage_and_limits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Replicas and batch jobs run elsewhere: a local path is fixed where the spec is loaded.
    assert ServeSpec().batch.storage_url == str(tmp_path / "gemma-unified-batches")
    assert build_spec({"batch": {"storage_url": "runs/b"}}).batch.storage_url == str(tmp_path / "runs" / "b")
    assert build_spec({"batch": {"storage_url": "s3://bucket/b"}}).batch.storage_url == "s3://bucket/b"
    batch = ServeSpec().batch
    assert (batch.max_file_bytes, batch.max_lines_per_batch, batch.ray_address) == (200 * 1024**2, 50_000, None)
    with pytest.raises(SpecError, match="batch.resources"):
        build_spec({"batch": {"resources": {"address": "ray://elsewhere:10001"}}})
    with pytest.raises(SpecError, match="batch.max_lines_per_batch"):
        build_spec({"batch": {"max_lines_per_batch": 0}})
