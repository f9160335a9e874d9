#!/usr/bin/env python
"""Convert a released cde checkpoint (hub id or local dir) into a cde_jax checkpoint dir:
`cde-jax convert` under its old name (same arguments, same exit codes).

    python scripts/convert_weights.py jxm/cde-small-v2 ./cde-small-v2-jax [--revision REV]
    python scripts/convert_weights.py ./released-dir ./out --dtype bfloat16
"""

import sys

from cde_jax import cli

if __name__ == "__main__":
    sys.exit(cli.main(["convert", *sys.argv[1:]]))
