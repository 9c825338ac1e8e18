"""One failure contract for every command.

Exit 0: everything succeeded. Exit 1: the command ran and some items (or a job) failed. Exit 2: it could not run
(bad spec, missing model or extra, unreachable storage or cluster, refused credentials). A failure that stops a
command prints one line, what failed and what to try; the traceback only with `--verbose`.
"""

from __future__ import annotations

import logging
import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from pipelines.errors import explain

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_COULD_NOT_RUN = 0, 1, 2
VERBOSE_FLAG = "--verbose"

err_console = Console(stderr=True)
_state = {"verbose": False}


def verbose() -> bool:
    return _state["verbose"]


def set_verbose(on: bool) -> None:
    _state["verbose"] = on
    if on:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("pipelines").setLevel(logging.INFO)
        logging.getLogger("jobs").setLevel(logging.INFO)


def report(exc: BaseException) -> None:
    """The one message of a command that could not run (and its traceback when verbose)."""
    if verbose():
        traceback.print_exception(exc, file=sys.stderr)
    hint = "" if verbose() else f" (rerun with {VERBOSE_FLAG} for the traceback)"
    err_console.print(f"[red]error:[/red] {escape(explain(exc))}{hint}", soft_wrap=True)


class _HideAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def quiet_library_logs() -> None:
    """Ray Data logs to the console (warnings, its issue detectors, a failure with its traceback before raising it)
    while the command shows its own progress, summary and one-line errors: unless verbose, its console lines are
    dropped (its ray-data.log in the Ray session folder keeps everything)."""
    if verbose():
        return
    import ray.data  # noqa: F401 - importing it sets up its loggers

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_HideAll())


class ContractGroup(TyperGroup):
    """The root command: `--verbose` anywhere on the line, and any unexpected exception becomes exit 2."""

    def parse_args(self, ctx, args):
        if VERBOSE_FLAG in args:  # `gemma-unified run ... --verbose` means the same as `gemma-unified --verbose run`
            args = [VERBOSE_FLAG, *[a for a in args if a != VERBOSE_FLAG]]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            report(exc)
            raise typer.Exit(EXIT_COULD_NOT_RUN) from None
