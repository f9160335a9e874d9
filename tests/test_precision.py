"""Compute dtypes: validated names, where half precision enters the program (matmul inputs
only, float32 accumulation), and bfloat16 fidelity against float32 on the same inputs:
per-row cosine of dataset embeddings, queries and documents, and the same top-10 lists on
the BEIR fixture of test_evaluation. The tiny synthetic checkpoint (random weights with
peaked attention); scripts/benchmark.py reports the same cosine at base size."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_evaluation import write_beir

import cde_jax
from cde_jax import loading
from cde_jax.config import CdeConfig, ModernBertConfig, modernbert_tiny
from cde_jax.evaluation import load_beir, rank_corpus
from cde_jax.params import abstract_model

BATCH = 8


def test_dtype_names_are_validated(synthetic):
    with pytest.raises(ValueError, match="unknown dtype 'bf16': choose one of float32, "
                                         "bfloat16, float16"):
        cde_jax.load(synthetic()[1], dtype="bf16")
    with pytest.raises(ValueError, match="unknown param_dtype 'half'"):
        ModernBertConfig(param_dtype="half")


def test_default_dtype_per_platform():
    assert [loading.default_dtype(p) for p in ("cpu", "gpu", "tpu")] == [
        "float32", "bfloat16", "bfloat16"]


def _dots(jaxpr):
    """Every dot_general equation of a closed jaxpr, nested calls included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _dots(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    yield from _dots(sub)


@pytest.mark.parametrize("activations", ["compute", "float32"])
def test_half_precision_enters_only_at_matmul_inputs(activations):
    """bfloat16 second stage: every encoder matmul (linears and both attention matmuls)
    reads bfloat16 and accumulates in float32; the linears write their output in the
    activation dtype (bfloat16 by default: cuBLAS and the MXU round once, no float32 copy
    goes through memory), attention its logits and output in float32; the heads' matmuls
    are float32 throughout."""
    cfg = modernbert_tiny(dtype="bfloat16", attention="head_major", activations=activations)
    graphdef, state = nnx.split(abstract_model(cfg, CdeConfig(transductive_corpus_size=24),
                                               has_null_embedding=False))

    def second_stage(st, ids, mask, dataset):
        stage = nnx.merge(graphdef, st).second_stage_model
        return stage(ids, mask, stage.prefix(dataset))

    ids = jax.ShapeDtypeStruct((2, 40), jnp.int32)
    jaxpr = jax.make_jaxpr(second_stage)(state, ids, ids, jax.ShapeDtypeStruct(
        (24, cfg.hidden_size), jnp.float32))
    kinds = {}
    for eqn in _dots(jaxpr.jaxpr):
        ins = tuple(str(v.aval.dtype) for v in eqn.invars)
        key = (ins, str(eqn.outvars[0].aval.dtype), str(eqn.params["preferred_element_type"]))
        kinds[key] = kinds.get(key, 0) + 1
    out = "bfloat16" if activations == "compute" else "float32"
    linear, attention = (("bfloat16", "bfloat16"), out, out), \
        (("bfloat16", "bfloat16"), "float32", "float32")
    full = (("float32", "float32"), "float32", "None")
    # 4 layers x (q, k, v, wo, wi, wo) + the prefix's layer-0 q, k, v; 4 layers x 2 attention
    # matmuls; heads: 2 x 2 (the output head and the soft-prompt head).
    expected = {linear: 4 * 6 + 3, attention: 4 * 2, full: 4}
    if linear == attention:
        expected = {linear: 4 * 8 + 3, full: 4}
    assert kinds == expected, kinds


# Bound on |cosine(bf16) - cosine(float32)| of a query-document pair, per `activations`:
# bfloat16 between ops (the default) rounds every activation, float32 only matmul inputs.
SCORE_ERROR = {"compute": 2e-3, "float32": 1e-3}


@pytest.fixture(scope="module", params=list(SCORE_ERROR))
def pair(synthetic, request):
    """(float32, bfloat16) models of the same tiny checkpoint, same kernel, the bfloat16 one
    with each `activations` setting."""
    converted = synthetic()[1]
    return (cde_jax.load(converted, attention="head_major"),
            cde_jax.load(converted, attention="head_major", dtype="bfloat16",
                         activations=request.param))


def row_cosines(a_nd, b_nd) -> np.ndarray:
    a, b = np.asarray(a_nd, np.float64), np.asarray(b_nd, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bfloat16_embeddings_keep_cosine(pair, random_docs):
    full, half = pair
    assert half.backbone_config.dtype == "bfloat16"
    docs = random_docs[:48]
    dataset = {m: m.embed_minicorpus(docs, batch_size=BATCH) for m in pair}
    queries = [" ".join(d.split()[-8:]) for d in random_docs[48:72]]
    cos = {"dataset": row_cosines(dataset[half], dataset[full])}
    for role, texts in (("query", queries), ("document", docs)):
        cos[role] = row_cosines(*(m.encode(texts, prompt_name=role, batch_size=BATCH,
                                           dataset_embeddings=dataset[m]) for m in (half, full)))
    worst = {k: float(v.min()) for k, v in cos.items()}
    print("bfloat16 vs float32, worst per-row cosine:", worst)
    assert min(worst.values()) >= 0.9999, worst
    assert min(worst.values()) < 1 - 1e-7  # bfloat16 really ran


def test_tpu_default_keeps_cosine(synthetic, random_docs):
    """What "auto" runs on TPUs, bfloat16 with rope_fused (interpret mode here: the same
    arithmetic, RoPE on bfloat16 q and k in float32 inside the kernel), against float32:
    the same bound as the CPU kernel's bfloat16."""
    converted = synthetic()[1]
    full = cde_jax.load(converted, attention="head_major")
    tpu = cde_jax.load(converted, attention="rope_fused", dtype="bfloat16")
    docs = random_docs[:8]
    queries = [" ".join(d.split()[-8:]) for d in random_docs[48:52]]
    dataset = {m: m.embed_minicorpus(docs, batch_size=BATCH) for m in (full, tpu)}
    cos = {"dataset": row_cosines(dataset[tpu], dataset[full])}
    for role, texts in (("query", queries), ("document", docs)):
        cos[role] = row_cosines(*(m.encode(texts, prompt_name=role, batch_size=BATCH,
                                           dataset_embeddings=dataset[m])
                                  for m in (tpu, full)))
    worst = {k: float(v.min()) for k, v in cos.items()}
    print("rope_fused bfloat16 vs float32, worst per-row cosine:", worst)
    assert 0.9999 <= min(worst.values()) < 1 - 1e-7, worst


def test_bfloat16_ranks_like_float32(pair, random_docs, tmp_path):
    """The same top-10 lists except where float32 itself nearly ties: random weights leave
    near-ties (q6's ranks 5 and 6 differ by 5e-5 in float32, 10x below bfloat16's score
    error, so no bfloat16 computation can be sure to keep their order); only such documents
    may trade places."""
    root = tmp_path / "beir"
    write_beir(root, random_docs)
    full, half = (rank_corpus(m, load_beir(root), 24, batch_size=BATCH, show_progress_bar=False)
                  for m in pair)
    assert list(full) == list(half) and len(full) == 8
    error = max(abs(full[q][d] - half[q][d]) for q in full for d in full[q])
    assert 1e-6 < error <= SCORE_ERROR[pair[1].backbone_config.activations], error
    identical = 0
    for q in full:
        top_full, top_half = list(full[q])[:10], list(half[q])[:10]
        identical += top_half == top_full
        # Any change is a swap of float32 near-ties: every pair bfloat16 orders the other way
        # round is closer in float32 than twice the score error, and nothing past float32's
        # rank 11 enters the list.
        assert set(top_half) <= set(list(full[q])[:11]), q
        for i, a in enumerate(top_half):
            for b in top_half[i + 1:]:
                assert full[q][a] >= full[q][b] - 2 * error, (q, a, b)
    print(f"bfloat16 score error {error:.1e}; identical top-10 lists for {identical} of 8 "
          "queries")
    assert identical >= 7  # q6: ranks 5 and 6 are 5e-5 apart in float32


def test_bfloat16_training_runs_and_records_its_runtime(synthetic, random_docs, tmp_path,
                                                        monkeypatch, capsys):
    """`cde-jax train --dtype bfloat16 --attention head_major`: the choices reach the model
    and are recorded resolved (a resume that would compute differently is refused); the
    loss is finite and the parameters stay float32."""
    from test_training import retrieval_examples, write_jsonl

    from cde_jax import cli
    from cde_jax.commands import runtime

    monkeypatch.setattr(runtime, "enable_compilation_cache", lambda: None)  # not in-process
    data = write_jsonl(tmp_path / "train.jsonl", retrieval_examples(random_docs, 8))
    out = tmp_path / "run"
    argv = ["train", "--model", str(synthetic()[0]), "--data", str(data), "--out", str(out),
            "--total-steps", "2", "--batch-size", "4", "--query-length", "16",
            "--document-length", "32", "--dtype", "bfloat16", "--attention", "head_major"]
    assert cli.main(argv) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["dtype"], saved["attention"]) == ("bfloat16", "head_major")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and np.isfinite(losses).all()
    trained = cde_jax.load(out / "model")
    assert trained.runner.params["second_stage_model"]["backbone"]["final_norm"][
        "scale"].dtype == jnp.float32
    assert cli.main(argv[:-4] + ["--resume"]) == 2  # float32 / auto now: settings differ
    assert "dtype 'bfloat16' -> 'float32'" in capsys.readouterr().err
