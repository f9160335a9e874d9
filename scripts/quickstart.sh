#!/usr/bin/env bash
# The main job, end to end: install cde-jax (inference only: no PyTorch, no test tools), get a
# checkpoint (the real jxm/cde-small-v2 when the Hugging Face hub is reachable, else a
# random-weight synthetic one), sample a minicorpus from a corpus, embed the corpus and some
# queries with the CLI, and search.
#
#   bash scripts/quickstart.sh                 # outputs in artifacts/quickstart/
#   QUICKSTART_PRESET=base bash scripts/quickstart.sh   # full-size synthetic fallback
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .

work=${QUICKSTART_DIR:-artifacts/quickstart}
mkdir -p "$work"
if [[ -d "$work/cde-small-v2-jax" ]]; then
  model="$work/cde-small-v2-jax"
elif cde-jax convert jxm/cde-small-v2 "$work/cde-small-v2-jax"; then
  model="$work/cde-small-v2-jax"
else
  preset=${QUICKSTART_PRESET:-tiny}
  model="$work/synthetic-$preset-jax"
  echo "hub unreachable: using a synthetic $preset checkpoint (random weights)" >&2
  if [[ ! -d "$model" ]]; then
    python3 scripts/make_synthetic_checkpoint.py "$work/synthetic-$preset" --preset "$preset" \
      --overwrite
    cde-jax convert "$work/synthetic-$preset" "$model"
  fi
fi

head -n 2000 cde_jax/data/random_docs.txt > "$work/corpus.txt"
printf '%s\n' "how do I check my phone's data usage?" "who is Jason Voorhees?" \
  "macdonald polynomials" > "$work/queries.txt"

cde-jax dataset-embeddings --model "$model" --input "$work/corpus.txt" --out "$work/dataset.npz"
cde-jax embed --model "$model" --input "$work/corpus.txt" --role document \
  --dataset-embeddings "$work/dataset.npz" --out "$work/corpus.npy"
cde-jax embed --model "$model" --input "$work/queries.txt" --role query \
  --dataset-embeddings "$work/dataset.npz" --out "$work/queries.npy"

python3 - "$work" "$model" <<'PY'
import sys
from pathlib import Path

import numpy as np

work = Path(sys.argv[1])
docs = (work / "corpus.txt").read_text(encoding="utf-8").split("\n")
queries = (work / "queries.txt").read_text(encoding="utf-8").split("\n")
scores = np.load(work / "queries.npy") @ np.load(work / "corpus.npy").T
for query, row in zip(queries, scores):
    best = np.argsort(-row)[:3]
    print(f"\n{query}")
    for i in best:
        print(f"  {row[i]:.3f}  {docs[i][:90]}")
print(f"\nembeddings: {work}/corpus.npy {np.load(work / 'corpus.npy').shape}")
if "synthetic" in sys.argv[2]:
    print("(random weights, a synthetic checkpoint: these scores mean nothing)")
PY
