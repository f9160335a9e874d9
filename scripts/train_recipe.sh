#!/usr/bin/env bash
# The contextual fine-tuning recipe end to end, each stage timed:
#   pairs -> cluster (k-means||, packed batches, the vectors kept) -> train (--packed-batches,
#   false-negative filtering with the cluster vectors, evaluation every EVAL_EVERY steps,
#   the best model kept) -> eval (the best model, `cde-jax eval`) -> export (`cde-jax
#   convert` of the best model) -> load (`cde_jax.load`, a query ranked against the corpus)
#
#   bash scripts/train_recipe.sh MODEL PAIRS.jsonl BEIR_DIR OUT [extra train flags...]
#
# Settings (environment): BATCH_SIZE (64), STEPS (1000), LEARNING_RATE (2e-5),
# THRESHOLD (0.9: the filter's cosine), EVAL_SPLIT (dev), EVAL_EVERY (100).
# OUT gets clustered.jsonl (+ its .queries.zarr / .documents.zarr vectors), run/ (the
# training: logs/ for TensorBoard, metrics.jsonl, model/, best_model/), eval.json,
# exported/ (converted, the best model), stages.tsv (seconds per stage).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
model=$1 pairs=$2 beir=$3 out=$4
shift 4
batch=${BATCH_SIZE:-64} steps=${STEPS:-1000} lr=${LEARNING_RATE:-2e-5}
threshold=${THRESHOLD:-0.9} split=${EVAL_SPLIT:-dev} every=${EVAL_EVERY:-100}
cde_jax=(python3 -m cde_jax.cli)
mkdir -p "$out"
: > "$out/stages.tsv"

stage() {  # stage NAME COMMAND...: runs it, prints and records its wall time
  local name=$1 start end
  shift
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  awk -v n="$name" -v s="$start" -v e="$end" 'BEGIN {printf "%s\t%.1f\n", n, e - s}' \
    | tee -a "$out/stages.tsv" | awk -F'\t' '{printf "== stage %s: %s s\n", $1, $2}'
}

stage pairs python3 -c 'import sys; n = sum(1 for line in open(sys.argv[1]) if line.strip());
print(f"{n} training pairs in {sys.argv[1]}")' "$pairs"
stage cluster "${cde_jax[@]}" cluster --model "$model" --data "$pairs" \
  --out "$out/clustered.jsonl" --batch-size "$batch" --overwrite -q
stage train "${cde_jax[@]}" train --model "$model" --data "$out/clustered.jsonl" \
  --out "$out/run" --packed-batches --batch-size "$batch" --total-steps "$steps" \
  --learning-rate "$lr" --false-negative-threshold "$threshold" \
  --filter-query-embeddings "$out/clustered.jsonl.queries.zarr" \
  --filter-document-embeddings "$out/clustered.jsonl.documents.zarr" \
  --eval-data "$beir" --eval-split "$split" --eval-every "$every" --keep-best ndcg@10 -q "$@"
stage eval "${cde_jax[@]}" eval --model "$out/run/best_model" --dataset "$beir" \
  --split "$split" --out "$out/eval.json" --overwrite -q
stage export "${cde_jax[@]}" convert "$out/run/best_model" "$out/exported" --overwrite
stage load python3 - "$out/exported" "$beir" <<'PY'
import json
import sys
from pathlib import Path

import cde_jax

model = cde_jax.load(sys.argv[1])
docs = [json.loads(line)["text"] for line in open(Path(sys.argv[2]) / "corpus.jsonl")]
query = json.loads(next(open(Path(sys.argv[2]) / "queries.jsonl")))["text"]
context = model.context(docs, seed=42)
scores = model.similarity(context.encode_query([query]), context.encode_document(docs))[0]
print(f"loaded {sys.argv[1]}: best document for {query[:40]!r}: {docs[scores.argmax()][:60]!r}")
PY
echo "== total: $(awk -F'\t' '{s += $2} END {printf "%.1f", s}' "$out/stages.tsv") s"
