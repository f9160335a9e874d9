"""What the commands that run the model share: their options (the model, how it computes:
dtype and attention kernel, the input), joining a multi-process run, the persistent XLA
compilation cache (a repeated run loads its programs instead of compiling them) and loading
the model."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax

from .. import attention, distributed
from ..config import ACTIVATIONS, DTYPES
from ..resources import cache_dir
from ..text_api import CdeModel, load

CACHE_ENV = "CDE_JAX_CACHE_DIR"
CACHE_HELP = (f"Compiled XLA programs are cached on disk so that repeated runs do not "
              f"recompile: in ${CACHE_ENV} if set, else $XDG_CACHE_HOME/cde-jax/xla "
              f"(default ~/.cache/cde-jax/xla).")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; every option's default shown, unless its help
    already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or "%(default)" in text
                or action.default in (None, False, [], argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def add_command(subparsers, name: str, doc: str, *, help: str, cache: bool = True
                ) -> argparse.ArgumentParser:
    """A subcommand's parser: `doc` (the module docstring, with its example) as description,
    the compile-cache note as epilog, and the output options every command has."""
    parser = subparsers.add_parser(name, help=help, description=doc,
                                   epilog=CACHE_HELP if cache else None,
                                   formatter_class=HelpFormatter)
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("-q", "--quiet", action="store_true",
                         help="no progress bars; errors only")
    chatter.add_argument("-v", "--verbose", action="store_true",
                         help="also informational messages (what is loaded, resumed, written)")
    return parser


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def add_compute_args(parser: argparse.ArgumentParser) -> None:
    """--dtype, --activations and --attention, for every command that runs the model (one
    definition)."""
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype: matmul inputs in it, float32 accumulation, norms "
                             "and softmax (default: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--activations", choices=ACTIVATIONS, default="compute",
                        help="with a half dtype, activations between ops in it (compute, the "
                             "default) or in float32 (the last 1e-4 of fidelity, twice the "
                             "memory traffic)")
    parser.add_argument("--attention", choices=attention.names(), default="auto",
                        help="attention kernel (default auto: on GPUs and TPUs the fastest "
                             "that matches xla, checked and timed at first use, see `cde-jax "
                             "tune`; head_major on CPU)")
    parser.add_argument("--kernel-check", action=argparse.BooleanOptionalAction, default=True,
                        help="on GPUs and TPUs, check a named --attention kernel against xla "
                             "at first use and refuse it if it differs (--no-kernel-check: "
                             "run it unchecked)")


def add_model_args(parser: argparse.ArgumentParser, *, processes: bool = True) -> None:
    """--model, --batch-size, the compute flags and (`processes`) the multi-process ones."""
    parser.add_argument("--model", required=True,
                        help="converted checkpoint dir, or a released one (config.json + "
                             "model.safetensors)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="texts per batch, every bucket (default: per platform, a "
                             "per-bucket size of about 4096 tokens on CPU, tens of thousands "
                             "on accelerators; see README)")
    add_compute_args(parser)
    if processes:
        distributed.add_args(parser)


def add_input_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--input", required=True,
                        help=".txt (one text per line, empty lines included), .jsonl (one "
                             "object per line) or .parquet (needs pyarrow)")
    parser.add_argument("--field", default="text",
                        help="the JSONL field or parquet column holding the text")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out instead of refusing")


def enable_compilation_cache() -> Path:
    """Caches every compiled program (even the quick ones) in $CDE_JAX_CACHE_DIR, else the
    user's cache dir (`resources.cache_dir`)."""
    path = cache_dir("xla", CACHE_ENV)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def start(args: argparse.Namespace, resume: str = distributed.RESUME) -> None:
    """Joins the multi-process run the flags describe (before JAX starts its backends) and
    turns the compilation cache on. `resume`: what the line for a lost peer ends with."""
    distributed.initialize(args, resume)
    enable_compilation_cache()


def load_model(args: argparse.Namespace) -> CdeModel:
    return distributed.all_succeed(
        lambda: load(args.model, dtype=args.dtype, activations=args.activations,
                     attention=args.attention, check_kernel=args.kernel_check),
        "loading the model")


# Arguments each process may set for itself: they change nothing in what is computed.
LOCAL_ARGS = frozenset({"process_id", "peer_timeout", "quiet", "verbose", "read_threads",
                        "progress", "func"})


def model_facts(model: CdeModel, batch_size: int | None) -> dict:
    """What the numbers depend on besides the inputs: the weights, the compute dtype and
    kernel (resolved for this host's devices) and the batch plan (sized for them)."""
    plan = model.plan.with_batch_size(batch_size)
    return {"model": model.fingerprint, "dtype": model.backbone_config.dtype,
            "activations": model.backbone_config.activations,
            "attention kernel": model.backbone_config.attention,
            "batch plan": dataclasses.asdict(plan)}


def agree_on_run(args: argparse.Namespace, facts: dict) -> None:
    """The run record, every process's equal to process 0's before any work
    (`distributed.agree`): the command's arguments (as flags, those in `LOCAL_ARGS` aside),
    the process count and `facts` (input digests, `model_facts`, ...; a fact named as a
    flag is that flag's value)."""
    record = {f"--{name.replace('_', '-')}": value for name, value in vars(args).items()
              if name not in LOCAL_ARGS}
    distributed.agree({**record, **facts, "processes": distributed.process_count()},
                      "the run")
