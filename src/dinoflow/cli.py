"""The project's ``kedro run``: Kedro's own command, with one short message for a user error.

Kedro loads this module as the project's CLI (``<package>.cli``). ``run`` takes every option of
Kedro's ``run`` (``--pipelines`` and the deprecated ``--pipeline`` both work) plus ``--verbose``.
A ``dinoflow.errors.UserError`` (a bad parameter, missing data, a full disk, a locked run
directory, an unreadable checkpoint...) ends the command with that one message and exit code 2;
the traceback goes to ``logs/dinoflow-errors.log`` (and to the screen with ``--verbose`` or
``DINOFLOW_VERBOSE=1``). SIGTERM and SIGINT end the active MLflow run as KILLED. Anything else
is a bug and keeps Kedro's traceback.
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import sys
import traceback
from pathlib import Path

import click
from kedro.framework.cli.project import run as kedro_run

from dinoflow.errors import UserError

ERROR_LOG = Path("logs/dinoflow-errors.log")


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) arrived: stop the run where it is."""


def user_error(exc: BaseException) -> UserError | None:
    """The UserError behind ``exc`` (Kedro and the runners may wrap it), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _log_traceback(exc: BaseException) -> Path:
    ERROR_LOG.parent.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    with ERROR_LOG.open("a") as f:
        f.write(f"\n===== {stamp} kedro {' '.join(sys.argv[1:])}\n")
        f.write("".join(traceback.format_exception(exc)))
    return ERROR_LOG


def _end_mlflow_runs(status: str) -> None:
    try:
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run(status=status)
    except Exception:  # noqa: BLE001 - the run itself already failed; do not mask why
        pass


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


@click.group(name="dinoflow")
def cli() -> None:
    """dinoflow's project commands."""


@cli.command(
    name="run",
    params=list(kedro_run.params),
    help=kedro_run.help,
    context_settings=kedro_run.context_settings,
)
@click.option(
    "--verbose",
    is_flag=True,
    default=False,
    help="Show the full traceback of a user error (it always goes to logs/).",
)
@click.pass_context
def run(ctx: click.Context, verbose: bool, **kwargs: object) -> object:
    verbose = verbose or os.environ.get("DINOFLOW_VERBOSE") == "1"
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return ctx.invoke(kedro_run, **kwargs)
    except (Interrupted, KeyboardInterrupt) as exc:
        _end_mlflow_runs("KILLED")
        click.secho(
            f"dinoflow: stopped by {exc or 'SIGINT'}; the MLflow run is marked KILLED, "
            "checkpoints written so far are kept (run the command again to resume)",
            fg="yellow",
            err=True,
        )
        ctx.exit(130)
    except Exception as exc:
        problem = user_error(exc)
        if problem is None:
            raise
        _end_mlflow_runs("FAILED")
        log = _log_traceback(exc)
        if verbose:
            traceback.print_exception(exc)
        click.secho(f"dinoflow: {problem}", fg="red", err=True)
        click.secho(f"(traceback in {log}; --verbose shows it here)", dim=True, err=True)
        ctx.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)
