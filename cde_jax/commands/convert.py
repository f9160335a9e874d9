"""`cde-jax convert SRC OUT`: a released cde checkpoint (a local dir, or a hub id such as
jxm/cde-small-v2 at --revision) -> a converted cde_jax checkpoint dir, written atomically.

From the hub only configs, safetensors and tokenizer files are downloaded, never code; a
pickle checkpoint is refused, never unpickled. `cde_jax.load("owner/name")` does the same
conversion itself, once, into its cache (see README: "The hub, both ways").

example:
  cde-jax convert jxm/cde-small-v2 ./cde-small-v2-jax --revision main
"""

from __future__ import annotations

from .. import convert
from . import runtime


def register(subparsers) -> None:
    parser = runtime.add_command(
        subparsers, "convert", __doc__, cache=False,
        help="convert a released checkpoint (dir or hub id) to a cde_jax dir")
    parser.add_argument("source", metavar="SRC",
                        help="hub id (owner/name) or a released-layout checkpoint directory")
    parser.add_argument("out", metavar="OUT",
                        help="output directory (written atomically; must not exist)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter dtype to store")
    parser.add_argument("--backbone-config", metavar="FILE",
                        help="a ModernBERT config.json for the backbone (default: "
                             "modernbert_config.json beside the checkpoint, else the preset "
                             "named by config.json's `embedder`)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--revision",
                        help="hub branch, tag or commit (hub ids only; default: main)")
    parser.set_defaults(func=run)


def run(args) -> int:
    out = convert.convert(args.source, args.out, param_dtype=args.dtype,
                          backbone_config=args.backbone_config, overwrite=args.overwrite,
                          revision=args.revision)
    print(f"wrote {out}")
    return 0
