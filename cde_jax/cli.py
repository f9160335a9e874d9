"""`cde-jax` console script: one subcommand per module in `cde_jax.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. Errors the user can fix (`validation.UserError`, a missing or existing
file) exit with status 2 and one clear line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .validation import UserError

COMMANDS = ("dataset_embeddings", "embed", "train", "eval")  # modules of cde_jax.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cde-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"cde_jax.commands.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError) as e:
        print(f"cde-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cde-jax {args.command}: interrupted: run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
