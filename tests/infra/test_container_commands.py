"""Every command line the manifests and images run resolves to a real command of the CLI it names, options included
(`gemma-unified`, and Ray's own `ray` and `serve` on VMs)."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml
from infra_paths import REPO


def _gemma_unified():
    import typer

    from jobs.cli import app

    return typer.main.get_command(app)


class InvalidCommand(AssertionError):
    pass


def resolve(cli, argv: list[str]):
    """Parse argv the way `cli` would, down to the leaf command, without running anything. Works for click and for
    typer's vendored click alike (their classes differ), and raises InvalidCommand on any usage error."""
    try:
        ctx = cli.make_context(cli.name or "cli", list(argv))
        command = cli
        while hasattr(command, "resolve_command"):
            args = [*ctx._protected_args, *ctx.args]
            name, command, rest = command.resolve_command(ctx, args)
            ctx = command.make_context(name, rest, parent=ctx)
    except Exception as exc:
        if any(cls.__name__ == "UsageError" for cls in type(exc).__mro__):
            raise InvalidCommand(f"{' '.join(argv)}: {exc.format_message()}") from None
        raise
    return command


def segments(shell: str) -> list[list[str]]:
    """The simple commands of a shell line (split on |, &&, ;)."""
    words = shlex.split(shell.replace(";", " ; "))
    parts, current = [], []
    for word in words:
        if word in ("|", "&&", ";"):
            parts.append(current)
            current = []
        else:
            current.append(word)
    return [p for p in parts + [current] if p]


def _gemma_commands(manifests) -> list[list[str]]:
    commands = []
    cron = manifests["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    commands += [c["command"] for c in cron["containers"]]
    commands += [s for s in segments(manifests["RayJob"]["spec"]["entrypoint"]) if s[0] == "gemma-unified"]
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        for line in (REPO / "infra" / "docker" / name).read_text().splitlines():
            if line.startswith("CMD "):
                commands.append(json.loads(line[4:]))
    return commands


def test_manifests_and_images_run_gemma_unified_commands(manifests):
    commands = _gemma_commands(manifests)
    assert len(commands) == 4  # CronJob, RayJob entrypoint, two image CMDs
    cli = _gemma_unified()
    for argv in commands:
        assert argv[0] == "gemma-unified"
        if argv[1:] == ["--help"]:
            continue  # the images' default command: covered by the --help tests below
        resolve(cli, argv[1:])  # raises on an unknown command, option or missing argument


def test_the_resolver_refuses_what_the_cli_would_refuse():
    cli = _gemma_unified()
    with pytest.raises(InvalidCommand, match="no-such-option"):
        resolve(cli, ["run", "job.yaml", "--no-such-option"])
    with pytest.raises(InvalidCommand, match="no-such-command"):
        resolve(cli, ["no-such-command"])
    with pytest.raises(InvalidCommand):
        resolve(cli, ["make-tiny-model"])  # its directory argument is required


@pytest.mark.parametrize(
    "command", [[], ["run"], ["schedule"], ["schedule", "run"], ["serve"], ["submit"], ["render-k8s"]]
)
def test_help_of_each_command_the_infra_uses(command):
    from typer.testing import CliRunner

    from jobs.cli import app

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output


def test_vm_nodes_start_ray_with_options_ray_has(rendered):
    from ray.scripts.scripts import cli as ray_cli

    config = yaml.safe_load(rendered["vm/cluster.yaml"])
    lines = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_commands = [s for line in lines for s in segments(line) if s[0] == "ray"]
    assert {tuple(s[:2]) for s in ray_commands} == {("ray", "stop"), ("ray", "start")}
    for argv in ray_commands:
        resolve(ray_cli, argv[1:])


def test_vm_serve_config_deploys_with_rays_serve_cli(rendered):
    from ray.serve.scripts import cli as serve_cli

    from jobs.deploy.vm import VM_SERVE_CONFIG

    config = yaml.safe_load(rendered["vm/cluster.yaml"])
    assert config["file_mounts"][VM_SERVE_CONFIG] == "./serve-config.yaml"
    resolve(serve_cli, ["deploy", VM_SERVE_CONFIG])
