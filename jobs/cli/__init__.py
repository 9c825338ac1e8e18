"""The `gemma-unified` command line: the composition root of jobs, serving and pipelines.

One module per command group; this one only builds the typer app and registers them. Each command imports what it
runs when it runs, so `--help` stays fast and a command never pays for another's imports.
"""

from __future__ import annotations

import typer

from jobs.cli.cluster import jobs_app, submit
from jobs.cli.demo import demo, make_tiny_model
from jobs.cli.deploy import render_k8s
from jobs.cli.failures import ContractGroup, set_verbose
from jobs.cli.media import inspect_command
from jobs.cli.plan import plan_command
from jobs.cli.run import run
from jobs.cli.schedule import schedule_app
from jobs.cli.serve import serve_command
from jobs.cli.show import show

app = typer.Typer(
    cls=ContractGroup,
    help="Batch and online inference for Gemma 4 12B Unified: images, audio and documents in, text out. "
    "Exit codes: 0 all succeeded, 1 some items failed, 2 could not run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="Log what happens, and print tracebacks of failures (accepted anywhere on the command line).",
    ),
) -> None:
    set_verbose(verbose)


app.command("inspect")(inspect_command)
app.command("run")(run)
app.command("make-tiny-model")(make_tiny_model)
app.command("demo")(demo)
app.command("serve")(serve_command)
app.command("plan")(plan_command)
app.command("render-k8s")(render_k8s)
app.command("submit")(submit)
app.command("show")(show)
app.add_typer(jobs_app, name="jobs")
app.add_typer(schedule_app, name="schedule")


def main() -> None:
    app()
