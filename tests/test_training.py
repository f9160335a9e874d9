"""Fine-tuning (cde_jax.training) on the tiny synthetic checkpoint, CPU, float32.

- loss and gradients of both stages vs a PyTorch autograd computation of the same loss
  through tests/torch_reference.py (randomness off);
- gradient cache + accumulation vs the full-batch gradient (randomness on);
- a synthetic retrieval task (query = a sentence of a random_docs document, positive = the
  document) must learn; the same run killed after a checkpoint and resumed must end with
  bit-identical parameters; its export must load in cde_jax and the PyTorch reference;
- one train step on 8 simulated devices vs 1 (subprocess);
- data: batches, determinism, bad lines named, nothing overwritten.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_rel_err
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file
from torch_reference import TorchCde

import cde_jax
from cde_jax import cli, sharding
from cde_jax.commands import runtime
from cde_jax.convert import keymap
from cde_jax.loading import read_checkpoint
from cde_jax.training import BatchConfig, Example, Stages, StepConfig, TrainData, data, step
from cde_jax.training.loss import contrastive_loss

TESTS = Path(__file__).resolve().parent
LOGIT_SCALE = 50.0


def retrieval_examples(docs: list[str], n: int, *, negatives: int = 0) -> list[dict]:
    """query = one sentence of a document, positive = that document."""
    rng = np.random.default_rng(0)
    long_docs = [d for d in docs if d.count(". ") >= 2 and len(d) > 150][:n]
    rows = []
    for i, doc in enumerate(long_docs):
        sentences = [s for s in doc.split(". ") if len(s) > 30] or [doc[:100]]
        rows.append({"query": sentences[rng.integers(len(sentences))], "positive": doc,
                     "negatives": [long_docs[(i + j + 1) % n] for j in range(negatives)]})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def loaded(ckpt_dir):
    model = cde_jax.load(ckpt_dir)
    return read_checkpoint(ckpt_dir), model, model.runner.params


def make_batches(model, examples, cfg: BatchConfig, n: int = 1):
    train_data = TrainData([data.parse_example(e) for e in examples], cfg, seed=0)
    tokenize = data.BatchTokenizer(model.tokenizer, train_data.cfg)
    texts = [train_data.batch(i) for i in range(n)]
    return texts, data.stack([tokenize(t) for t in texts])


def micro(batches, i):
    return {k: jnp.asarray(v[i]) for k, v in batches.items()}


# --- loss -----------------------------------------------------------------------------------
def test_contrastive_loss_soft_labels():
    q = np.array([[1.0, 0.0], [1.0, 0.1]], np.float32)
    d = np.array([[3.0, 0.0], [1.0, 1.0], [3.0, 0.0]], np.float32)
    # Query 0's positive (label 7) appears twice (docs 0 and 2): half the mass on each.
    loss, acc = jax.jit(contrastive_loss, static_argnums=4)(
        jnp.asarray(q), jnp.asarray(d), jnp.array([7, 5]), jnp.array([7, 5, 7]), 2.0)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        d / np.linalg.norm(d, axis=1, keepdims=True)).T
    logp = 2.0 * cos - np.log(np.exp(2.0 * cos).sum(axis=1, keepdims=True))
    expected = -(0.5 * logp[0, 0] + 0.5 * logp[0, 2] + logp[1, 1]) / 2
    assert abs(float(loss) - expected) <= 1e-6 * abs(expected)
    assert float(acc) == 0.5  # query 1 prefers doc 0 (cos 0.995) to its positive (0.77)


# --- parity with PyTorch autograd ------------------------------------------------------------
def test_loss_and_gradients_match_torch_autograd(synthetic, random_docs):
    released, converted = synthetic()
    ckpt, model, params = loaded(converted)
    rows = retrieval_examples(random_docs, 4, negatives=1)
    rows[1]["positive"] = rows[0]["positive"]  # the same document twice: soft labels
    (text,), batches = make_batches(model, rows, BatchConfig(batch_size=4, negatives=1,
                                                             corpus_size=512, query_length=32,
                                                             document_length=48))
    batch = micro(batches, 0)
    assert len(set(text.doc_label.tolist())) < len(text.documents)
    stages = Stages(model.runner.graphdef, StepConfig(total_steps=1, permute=False,
                                               sequence_dropout=0.0))
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, b: step.batch_loss(stages, p, b, jax.random.PRNGKey(0), LOGIT_SCALE),
        has_aux=True))
    (loss, acc), grads = grad_fn(params, batch)

    ref = TorchCde(released)
    dataset = ref.first_stage_tensor(batch["corpus_ids"], batch["corpus_mask"])
    q = ref.second_stage_tensor(batch["query_ids"], batch["query_mask"], dataset)
    d = ref.second_stage_tensor(batch["doc_ids"], batch["doc_mask"], dataset)
    scores = LOGIT_SCALE * torch.nn.functional.normalize(q) @ torch.nn.functional.normalize(d).T
    same = torch.tensor([[p == doc for doc in text.documents]
                         for p in text.documents[:len(text.queries)]], dtype=torch.float32)
    ref_loss = torch.nn.functional.cross_entropy(scores, same / same.sum(1, keepdim=True))
    ref_loss.backward()
    ref_acc = same[torch.arange(len(same)), scores.argmax(1)].mean()

    assert abs(float(loss) - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    assert float(acc) == ref_acc.item()
    flat_grads = {"/".join(str(k.key) for k in path): g
                  for path, g in jax.tree_util.tree_leaves_with_path(grads)}
    ref_grads = dict((name, p.grad) for name, p in ref.named_parameters())
    errors = {}
    for path, g in flat_grads.items():
        name, transform = keymap.to_hf_key(path)
        errors[path] = max_rel_err(g, transform.to_jax(ref_grads[name].numpy(), g.shape))
    worst = max(errors, key=errors.get)
    print(f"loss {float(loss):.6f} vs torch {ref_loss.item():.6f}; worst gradient "
          f"{worst}: {errors[worst]:.2e}")
    assert len(errors) == len(ref_grads) and {p.split("/")[0] for p in errors} == set(
        step.STAGE_MODULES.values())
    assert errors[worst] <= 1e-4
    for stage in step.STAGE_MODULES.values():  # gradients really reach both stages
        assert max(float(jnp.abs(g).max()) for p, g in flat_grads.items()
                   if p.startswith(stage)) > 1e-6


# --- gradient cache and accumulation ---------------------------------------------------------
def test_gradient_cache_and_accumulation_equal_full_batch(synthetic, random_docs):
    """Randomness on (per-row prefix order, sequence dropout), chunks of 4 rows, 2 micro-batches:
    the cached gradient equals the mean of the two full-batch gradients. (A minicorpus of 64
    documents: the property does not depend on its size, and 512 costs 8x the time.)"""
    _, converted = synthetic(null_embedding=True)
    ckpt, model, params = loaded(converted)
    _, batches = make_batches(model, retrieval_examples(random_docs, 16, negatives=1),
                              BatchConfig(batch_size=8, negatives=1, corpus_size=64,
                                          query_length=24, document_length=48), n=2)
    common = dict(total_steps=1, permute=True, sequence_dropout=0.3)
    full = Stages(model.runner.graphdef, StepConfig(**common))
    cached = Stages(model.runner.graphdef, StepConfig(**common, grad_cache_rows=4))
    key = jax.random.PRNGKey(3)

    full_fn = jax.jit(jax.value_and_grad(
        lambda p, b, k: step.batch_loss(full, p, b, k, LOGIT_SCALE), has_aux=True))
    results = [full_fn(params, micro(batches, i), jax.random.fold_in(key, i)) for i in range(2)]
    want_loss = np.mean([float(r[0][0]) for r in results])
    want = jax.tree.map(lambda a, b: (a + b) / 2, results[0][1], results[1][1])
    (loss, _), got = jax.jit(lambda p, b: step.loss_and_grad(cached, p, b, key, LOGIT_SCALE))(
        params, {k: jnp.asarray(v) for k, v in batches.items()})

    assert abs(float(loss) - want_loss) <= 1e-5 * want_loss
    errors = jax.tree.map(max_rel_err, got, want)
    worst = max(jax.tree.leaves(errors))
    print(f"loss {float(loss):.6f} vs full {want_loss:.6f}; worst gradient rel err {worst:.2e}")
    assert worst <= 1e-5
    # The gradient reaches the null embedding (dropout happened) and the first stage.
    assert float(jnp.abs(got["second_stage_model"]["sequence_dropout_null_embedding"]).max()) > 0
    assert float(jnp.abs(got["first_stage_model"]["mlp"]["fc1"]["kernel"]).max()) > 0


def test_freezing_a_stage_keeps_it_fixed():
    mesh = sharding.make_mesh()
    params = jax.device_put({"first_stage_model": {"w": jnp.ones((2, 2))},
                             "second_stage_model": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}},
                            sharding.replicated(mesh))
    grads = jax.tree.map(jnp.ones_like, params)
    opt = step.make_optimizer(StepConfig(total_steps=10, learning_rate=0.1,
                                         freeze=("first",)), params)
    updates, _ = jax.jit(opt.update)(grads, step.init_opt_state(opt, params, mesh), params)
    assert float(jnp.abs(updates["first_stage_model"]["w"]).max()) == 0.0
    assert float(jnp.abs(updates["second_stage_model"]["w"]).min()) > 0.0
    with pytest.raises(ValueError, match="nothing to train"):
        StepConfig(total_steps=10, freeze=tuple(step.STAGE_MODULES))


def test_learning_rate_warmup_then_linear_decay():
    lr = step.learning_rate(StepConfig(total_steps=10, learning_rate=1.0, warmup_steps=4))
    got = [float(lr(i)) for i in (0, 2, 4, 7, 10)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-7)


# --- command runs (module fixtures) -----------------------------------------------------------
# Checkpoints every 15 steps: killed 3 steps after step 30. (Accuracy reaches 1.0 by step 40.)
CLI_STEPS, CHECKPOINT_EVERY, KILL_AT = 60, 15, 33


class CliRuns(NamedTuple):
    tmp: Path
    released: Path
    logged_before_kill: list[dict]
    resumed_stdout: str
    args: list[str]  # the full run's command line


TIMINGS = ("step_seconds", "examples_per_second", "tokens_per_second")  # wall clock


def metrics(out: Path) -> list[dict]:
    """The logged rows without their wall-clock timings (which no two runs share)."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_python(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cli_runs(tiny_checkpoint, random_docs, tmp_path_factory):
    """One 60-step training three times: uninterrupted; SIGKILLed during step 34; resumed.
    They share the session's compilation cache, so the train step compiles once."""
    tmp = tmp_path_factory.mktemp("cli_runs")
    released = tiny_checkpoint[0]
    train_file = write_jsonl(tmp / "train.jsonl", retrieval_examples(random_docs, 192))

    def args(out):
        return ["train", "--model", str(released), "--data", str(train_file), "--out",
                str(out), "--total-steps", str(CLI_STEPS), "--batch-size", "8",
                "--learning-rate", "1e-3", "--warmup-steps", "10", "--query-length", "24",
                "--document-length", "48", "--checkpoint-every", str(CHECKPOINT_EVERY),
                "--seed", "1"]

    full = run_python("-m", "cde_jax.cli", *args(tmp / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_python(str(TESTS / "train_killed.py"), str(KILL_AT), *args(tmp / "resumed"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    logged = metrics(tmp / "resumed")
    resumed = run_python("-m", "cde_jax.cli", *args(tmp / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return CliRuns(tmp, released, logged, resumed.stdout, args(tmp / "full"))


@pytest.fixture(scope="module")
def devices(tiny_checkpoint, random_docs, tmp_path_factory):
    """One train step on 8 simulated devices and on 1 (tests/multidevice_step.py)."""
    tmp = tmp_path_factory.mktemp("devices")
    devices_file = write_jsonl(tmp / "devices.jsonl",
                               retrieval_examples(random_docs, 48, negatives=1))
    proc = run_python(str(TESTS / "multidevice_step.py"), str(tiny_checkpoint[0]),
                      str(devices_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_synthetic_retrieval_task_learns(cli_runs):
    rows = metrics(cli_runs.tmp / "full")
    assert [r["step"] for r in rows] == list(range(1, CLI_STEPS + 1))
    loss = np.array([r["loss"] for r in rows])
    acc = np.array([r["accuracy"] for r in rows])
    first, last = slice(0, 10), slice(CLI_STEPS - 10, CLI_STEPS)
    print("loss every 10 steps:", np.round(loss[::10], 3).tolist(), "last", round(loss[-1], 3))
    print("accuracy every 10 steps:", np.round(acc[::10], 3).tolist(), "last", acc[-1])
    print(f"mean loss {loss[first].mean():.3f} -> {loss[last].mean():.3f}; mean accuracy "
          f"{acc[first].mean():.3f} -> {acc[last].mean():.3f}")
    assert loss[last].mean() < 0.1 * loss[first].mean()
    assert acc[last].mean() >= 0.95
    assert acc[last].mean() - acc[first].mean() >= 0.15


def test_killed_and_resumed_run_ends_bit_identical(cli_runs):
    tmp = cli_runs.tmp
    assert cli_runs.logged_before_kill[-1]["step"] > 30  # steps after the checkpoint ran
    assert "resumed from step 30" in cli_runs.resumed_stdout
    full = load_file(str(tmp / "full" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp / "resumed" / "model" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    different = [k for k in full if not np.array_equal(full[k], resumed[k])]
    assert not different, different[:5]
    # The resumed run replayed from a checkpoint: its log has each step once, equal values.
    assert metrics(tmp / "resumed") == metrics(tmp / "full")


@pytest.fixture
def in_process_cli(monkeypatch):
    """`cli.main` in this process, without switching its JAX compilation cache."""
    monkeypatch.setattr(runtime, "enable_compilation_cache", lambda: None)
    return cli.main


def test_resume_refuses_other_settings(cli_runs, in_process_cli, capsys):
    log_before = (cli_runs.tmp / "full" / "metrics.jsonl").read_bytes()
    code = in_process_cli([*cli_runs.args, "--resume", "--learning-rate", "5e-4"])
    assert code == 2
    assert "step.learning_rate 0.001 -> 0.0005" in capsys.readouterr().err
    assert (cli_runs.tmp / "full" / "metrics.jsonl").read_bytes() == log_before


def test_export_loads_in_cde_jax_and_torch(cli_runs, random_docs):
    released, exported = cli_runs.released, cli_runs.tmp / "full" / "model"
    ours, ref = cde_jax.load(exported), TorchCde(exported)
    assert json.loads((exported / "config.json").read_text())["transductive_corpus_size"] == 512
    before = load_file(str(released / "model.safetensors"))
    after = load_file(str(exported / "model.safetensors"))
    assert before.keys() == after.keys()
    name = "second_stage_model.output_projection.0.weight"
    assert np.abs(after[name] - before[name]).max() > 1e-3 * np.abs(before[name]).max()
    ids, mask = ours.tokenizer(["search_document: " + d for d in random_docs[:6]])
    ctx_ours, ctx_ref = ours.first_stage(ids, mask), ref.first_stage(ids, mask)
    assert max_rel_err(ctx_ours, ctx_ref) <= 1e-4
    assert max_rel_err(ours.second_stage(ids, mask, ctx_ours),
                       ref.second_stage(ids, mask, ctx_ref)) <= 1e-4


# --- 8 simulated devices ----------------------------------------------------------------------
def test_eight_devices_match_one(devices):
    print(devices)
    assert devices["batch_specs_8"] == [str(PartitionSpec(None, "data"))]
    one, eight = devices["metrics_1"], devices["metrics_8"]
    for key in ("loss", "grad_norm"):
        assert abs(eight[key] - one[key]) <= 1e-5 * one[key]
    assert eight["accuracy"] == one["accuracy"]
    assert devices["max_update"] > 1e-5  # the step really moved the parameters
    assert devices["params_rel_err"] <= 1e-5  # max |a - b| / max |b| over the whole model


# --- data ----------------------------------------------------------------------------------------
def examples(n, clusters=None, negatives=0):
    return [Example(f"q{i}", f"doc {i}", tuple(f"neg {i}.{j}" for j in range(negatives)),
                    None if clusters is None else i % clusters, i + 1) for i in range(n)]


def test_batches_are_deterministic_and_hold_their_minicorpus():
    cfg = BatchConfig(batch_size=4, negatives=2, corpus_size=8)
    a, b = TrainData(examples(10, negatives=3), cfg, 5), TrainData(examples(10, negatives=3),
                                                                   cfg, 5)
    assert a.batches_per_epoch == 2
    for pos in (0, 1, 2, 7):  # positions past the first epoch included
        x, y = a.batch(pos), b.batch(pos)
        assert x.queries == y.queries and x.documents == y.documents
        np.testing.assert_array_equal(x.corpus, y.corpus)
    x = a.batch(0)
    assert len(x.queries) == 4 and len(x.documents) == 12 and x.queries[0].startswith(
        "search_query: ") and all(d.startswith("search_document: ") for d in x.documents)
    assert len(x.corpus) == 8 and len(set(x.corpus.tolist())) == 8  # 12 docs -> 8, no repeats
    for i, q in enumerate(x.queries):  # each query's positive is its own document
        assert x.documents[i] == "search_document: doc " + q.split("q")[-1]
    assert a.batch(0).queries != a.batch(2).queries  # a new epoch reshuffles
    assert TrainData(examples(10, negatives=3), cfg, 6).batch(0).queries != x.queries


def test_minicorpus_oversampling():
    small = BatchConfig(batch_size=4, negatives=0, corpus_size=10)
    assert len(TrainData(examples(8), small, 0).batch(0).corpus) == 4
    over = TrainData(examples(8), BatchConfig(batch_size=4, negatives=0, corpus_size=10,
                                              oversample_corpus=True), 0).batch(0).corpus
    assert len(over) == 10 and set(over.tolist()) == {0, 1, 2, 3}


def test_batches_grouped_by_cluster():
    cfg = BatchConfig(batch_size=4, negatives=0, corpus_size=4, group_by_cluster=True)
    rows = examples(26, clusters=3)  # clusters of 9, 9, 8: 6 single-cluster batches
    train_data = TrainData(rows, cfg, 0)
    by_query = {"search_query: " + e.query: e.cluster for e in rows}
    mixed = 0
    for pos in range(train_data.batches_per_epoch):
        mixed += len({by_query[q] for q in train_data.batch(pos).queries}) > 1
    assert train_data.batches_per_epoch == 6 and mixed == 0


BAD_LINES = [
    ('{"query": "q", "positive": ', "line 2: invalid JSON"),
    ('{"query": "q"}', "line 2: missing field 'positive'"),
    ('{"query": "q", "positive": "  "}', "line 2: 'positive' is empty"),
    ('{"query": 3, "positive": "d"}', "line 2: 'query' is int, not a string"),
    ('{"query": "q", "positive": "d", "negatives": ["n", 4]}',
     r"line 2: 'negatives'\[1\] is int"),
    ('["q", "d"]', "line 2: expected a JSON object"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_bad_data_names_the_line_and_writes_nothing(tmp_path, in_process_cli, capsys, bad,
                                                    message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "positive": "d"}, bad])
    with pytest.raises(ValueError, match=message):
        data.read_examples(path)
    out = tmp_path / "out"
    code = in_process_cli(["train", "--model", str(tmp_path / "unused"), "--data", str(path),
                     "--out", str(out), "--total-steps", "5", "--batch-size", "1"])
    assert code == 2 and "line 2" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_never_overwritten(synthetic, tmp_path, in_process_cli, capsys):
    released, _ = synthetic()
    path = write_jsonl(tmp_path / "ok.jsonl", [{"query": "q", "positive": "d"}] * 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = in_process_cli(["train", "--model", str(released), "--data", str(path), "--out",
                           str(out), "--total-steps", "5", "--batch-size", "2"])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
