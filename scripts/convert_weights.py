#!/usr/bin/env python
"""Convert a released cde checkpoint (hub id or local dir) into a cde_jax checkpoint dir.

    python scripts/convert_weights.py jxm/cde-small-v2 ./cde-small-v2-jax
    python scripts/convert_weights.py ./released-dir ./out --dtype bfloat16
"""

import argparse
import sys

from cde_jax.convert import convert
from cde_jax.validation import UserError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="hub id (owner/name) or a local checkpoint directory")
    ap.add_argument("out", help="output directory (written atomically; must not exist)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="parameter dtype to store")
    ap.add_argument("--backbone-config", help="a ModernBERT config.json for the backbone")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = ap.parse_args(argv)
    try:
        out = convert(args.source, args.out, param_dtype=args.dtype,
                      backbone_config=args.backbone_config, overwrite=args.overwrite)
    except (UserError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
