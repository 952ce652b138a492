"""The command line: parse, load the config, make one core call, map errors to exit codes.

The CLI is the only part of te-scheduler that prints or exits; exit codes are
:class:`~scheduler.errors.ExitStatus`. ``base`` holds the group and its options, ``commands``
and ``db`` the commands, registered on the group when they are imported here.
"""

from __future__ import annotations

import sys

import click

from scheduler.cli import (  # noqa: F401  (importing them registers the commands)
    commands,
    db,
    results,
    web,
)
from scheduler.cli.base import cli, fail
from scheduler.errors import ExitStatus, SchedulerError

__all__ = ["cli", "main"]


def main() -> None:
    """Console entry point: run the CLI and turn known errors into one line and an exit code."""
    try:
        cli.main(prog_name="te-scheduler", standalone_mode=False)
    except SchedulerError as error:
        fail(error)
    except click.exceptions.Abort:
        sys.exit(ExitStatus.INTERRUPTED)
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "te-scheduler"
        click.echo(
            f"te-scheduler: error: {error.format_message()} (see `{command} --help`)", err=True
        )
        sys.exit(error.exit_code)
    except click.ClickException as error:
        click.echo(f"te-scheduler: error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        sys.exit(ExitStatus.OK)
    except Exception as error:  # a bug: one line, unless the user asked for the traceback
        if "--debug" in sys.argv:
            raise
        click.echo(
            f"te-scheduler: internal error: {error!r} (rerun with --debug for the "
            "traceback, and please report it)",
            err=True,
        )
        sys.exit(ExitStatus.FAILED)
