"""`cde-jax` console script: one subcommand per module in `cde_jax.commands`.

Each command module defines `register(subparsers)`, which adds its parser (through
`commands.runtime.add_command`) and sets `func(args) -> int`. Errors the user can fix
(`validation.UserError`, a missing or existing file) exit with status 2 and one clear line;
anything else is a bug and keeps its traceback. Ctrl-C (exit 130), SIGTERM (143) and SIGHUP
(129), what schedulers and preemptions send, end a command with one line saying how to
resume (`stopping.stop_signals`); in a multi-process run every process stops that way,
and a peer that is gone ends the others with one line (`stopping.end`). Warnings
(cde_jax's log and Python's `warnings`) print as "cde-jax: warning: ..." above the progress
bars, not into them; --quiet keeps errors only, --verbose adds informational lines; absl's
and orbax's lines below ERROR are silenced.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import signal
import sys
import warnings

from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__, stopping
from .validation import UserError

# modules of cde_jax.commands
COMMANDS = ("convert", "dataset_embeddings", "embed", "cluster", "train", "eval", "serve",
            "tune")
QUIET_LOGGERS = ("absl", "orbax")


def quiet_logs() -> None:
    """Keeps absl's and orbax's INFO and WARNING lines out of the CLI's output (orbax logs
    every save and restore, and warns about its own internals on each, e.g. "Skipping merge
    of OCDBT checkpoints"); their errors still show."""
    from absl import logging as absl_logging  # installed with optax and orbax

    absl_logging.set_verbosity(absl_logging.ERROR)
    absl_logging.set_stderrthreshold("error")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cde-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"cde_jax.commands.{name}").register(sub)
    return parser


CLI_LOGGERS = ("cde_jax", "py.warnings")  # ours, and Python's warnings once captured


@contextlib.contextmanager
def cli_logging(quiet: bool, verbose: bool):
    """For the command: one stderr handler for cde_jax's log and Python's warnings, at the
    level asked for, drawn above the progress bars. Restored afterwards, so that `main`
    called inside another program (or a test) leaves its logging as it was."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cde-jax: %(levelname)s: %(message)s"))
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    loggers = [logging.getLogger(name) for name in CLI_LOGGERS]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    format_warning = warnings.formatwarning
    for lg in loggers:
        lg.handlers[:], lg.propagate = [handler], False
        lg.setLevel(level)
    logging.captureWarnings(True)
    warnings.formatwarning = lambda message, *_: str(message)  # the text, not the source line
    try:
        with logging_redirect_tqdm(loggers=loggers):
            yield
    finally:
        logging.captureWarnings(False)
        warnings.formatwarning = format_warning
        for lg, (handlers, lvl, propagate) in zip(loggers, saved):
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(lvl)


def main(argv=None) -> int:
    quiet_logs()
    args = build_parser().parse_args(argv)
    with stopping.stop_signals():
        code, line, error = run(args)
        return stopping.end(f"cde-jax {args.command}", code, line, error)


def run(args) -> tuple[int, str | None, BaseException | None]:
    """The command's (exit status, its last line, an unexpected error of a multi-process
    run that `stopping.end` explains)."""
    try:
        with cli_logging(args.quiet, args.verbose):
            return int(args.func(args) or 0), None, None
    except (UserError, FileNotFoundError) as e:
        return 2, f"error: {e}", None
    except KeyboardInterrupt:
        return (*dataclasses.astuple(stopping.signal_stop(signal.SIGINT)), None)
    except stopping.Terminated as e:
        return (*dataclasses.astuple(stopping.signal_stop(e.signum)), None)
    except Exception as e:
        return 1, None, e


if __name__ == "__main__":
    sys.exit(main())
