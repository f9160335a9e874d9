#!/usr/bin/env python
"""Write a random-weight checkpoint in the released cde-small-v2 layout (for tests/benchmarks).

    python scripts/make_synthetic_checkpoint.py /tmp/cde-tiny --preset tiny
"""

import argparse
import sys

from cde_jax.convert.synthetic import make_synthetic_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--preset", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ignore-instruction-tokens", type=int, choices=[0, 1], default=1)
    ap.add_argument("--corpus-size", type=int, default=512,
                    help="transductive_corpus_size in config.json")
    ap.add_argument("--null-embedding", action="store_true",
                    help="include sequence_dropout_null_embedding")
    ap.add_argument("--tokenizer-dir", help="tokenizer files to copy (default: the packaged "
                    "ModernBERT tokenizer)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = make_synthetic_checkpoint(
        args.out, preset=args.preset, seed=args.seed,
        ignore_instruction_tokens=bool(args.ignore_instruction_tokens),
        corpus_size=args.corpus_size, null_embedding=args.null_embedding,
        tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
