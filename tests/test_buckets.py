"""Text API: minicorpus sampling, encode in length buckets (order, compile bound, equality
with one-at-a-time), dataset-embeddings files."""

import warnings

import numpy as np
import pytest

import cde_jax
from cde_jax import buckets
from cde_jax.buckets import BucketPlan, default_plan, device_memory
from cde_jax.minicorpus import DatasetEmbeddings, fallback_minicorpus, sample_minicorpus
from cde_jax.profiling import count_compiles


@pytest.fixture(scope="module")
def model(synthetic):
    return cde_jax.load(synthetic()[1])


@pytest.fixture(scope="module")
def ctx(model):
    return model.embed_dataset(fallback_minicorpus(), seed=0)


def test_fallback_minicorpus_is_random_docs(model, random_docs):
    assert fallback_minicorpus() == random_docs
    emb = model.embed_dataset(fallback_minicorpus(), seed=5)
    assert emb.shape == (512, 64) and emb.dtype == np.float32
    # Each row is its document's first-stage embedding, unbucketed: every 8th row, spread
    # over the buckets (rows are computed one document each, so a sample checks the order).
    docs = sample_minicorpus(fallback_minicorpus(), 512, seed=5)
    rows = np.arange(3, 512, 8)
    ids, mask = model.tokenizer(["search_document: " + docs[i] for i in rows])
    np.testing.assert_allclose(emb[rows], model.first_stage(ids, mask), rtol=0, atol=1e-6)


def test_oversampling_is_deterministic_and_warned(model, random_docs):
    few = random_docs[:10]
    with pytest.warns(UserWarning, match="only 10 texts .* oversampling"):
        a = model.embed_dataset(few, seed=1)
    with pytest.warns(UserWarning):
        b = model.embed_dataset(few, seed=1)
        c = model.embed_dataset(few, seed=2)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (512, 64) and not np.array_equal(a, c)
    chosen = sample_minicorpus(few, 512, seed=1)
    assert set(chosen) <= set(few) and len(chosen) == 512


def test_more_texts_are_sampled_to_exactly_corpus_size(random_docs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = sample_minicorpus(random_docs[:600], 512, seed=0)
    assert len(chosen) == 512 and len(set(chosen)) == len(set(random_docs[:600]) & set(chosen))
    # docs/model.md §4's rule, verbatim.
    expected = np.random.default_rng(0).choice(random_docs[:600], 512, replace=False)
    assert chosen == list(expected)


def test_empty_and_bad_minicorpus(model):
    with pytest.raises(ValueError, match="empty list"):
        model.embed_dataset([])
    with pytest.raises(TypeError, match="index 2 is int"):
        model.embed_dataset(["a", "b", 3])


def test_encode_order_buckets_and_compiles(model, ctx, random_docs):
    # Lengths spread over all buckets, shuffled; an empty string and a colon-prefixed text.
    texts = [d[: (i * 53) % 1500] for i, d in enumerate(random_docs[:40])] + ["", "x: y"]
    plan = model.plan
    with count_compiles() as compiles:
        out = model.encode(texts, prompt_name="query", dataset_embeddings=ctx)
    assert out.shape == (len(texts), 64)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # At most one program per bucket for the second stage, plus the context preparation.
    assert compiles.count <= len(plan.lengths) + 1, compiles.count
    with count_compiles() as again:
        model.encode(texts[::-1], prompt_name="query", dataset_embeddings=ctx)
    assert again.count == 0
    # Equal to one text at a time, unpadded (a compile per length: a sample across buckets).
    picked = [i for i in np.argsort([len(t) for t in texts])[::4]]
    one = np.stack([model.second_stage(*model.tokenizer(["search_query: " + texts[i]]), ctx)[0]
                    for i in picked])
    one /= np.linalg.norm(one, axis=1, keepdims=True)
    diff = np.abs(out[picked] - one).max()
    print(f"bucketed vs one-at-a-time: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_encode_options(model, ctx):
    texts = ["hello world", "search me"]
    raw = model.encode(texts, prompt="clustering: ", dataset_embeddings=ctx,
                       normalize_embeddings=False)
    direct = model.second_stage(*model.tokenizer(["clustering: " + t for t in texts]), ctx)
    np.testing.assert_allclose(raw, direct, rtol=0, atol=1e-6)
    q = model.context(ctx).encode_query(texts)
    np.testing.assert_allclose(q, model.encode(texts, prompt_name="query",
                                               dataset_embeddings=ctx), atol=0)
    with pytest.raises(ValueError, match="prompt_name must be one of"):
        model.encode(texts, prompt_name="search", dataset_embeddings=ctx)
    with pytest.raises(TypeError, match="index 1 is NoneType"):
        model.encode(["ok", None], dataset_embeddings=ctx)
    bad = ctx.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"row\(s\) \[7\]"):
        model.encode(texts, dataset_embeddings=bad)
    with pytest.raises(ValueError, match=r"must be \(n, 64\)"):
        model.encode(texts, dataset_embeddings=ctx[:, :32])


def test_fixed_batch_size_plan(model, ctx, random_docs):
    texts = random_docs[:11]
    a = model.encode(texts, prompt_name="document", dataset_embeddings=ctx, batch_size=4)
    b = model.encode(texts, prompt_name="document", dataset_embeddings=ctx)
    assert np.abs(a - b).max() <= 1e-5
    assert BucketPlan().with_batch_size(4).batch_size(128, 1) == 4


def test_dataset_embeddings_file(model, ctx, tmp_path, synthetic):
    record = model.dataset_embeddings_file(fallback_minicorpus(), seed=0)
    np.testing.assert_array_equal(record.embeddings, ctx)
    path = record.save(tmp_path / "ctx.npz")
    loaded = model.load_dataset_embeddings(path)
    assert (loaded.prefix, loaded.seed, loaded.fingerprint) == ("search_document: ", 0,
                                                                 model.fingerprint)
    np.testing.assert_array_equal(loaded.embeddings, ctx)
    other = DatasetEmbeddings(ctx, "0123456789abcdef", "search_document: ", 0).save(
        tmp_path / "other.npz")
    with pytest.raises(ValueError, match="made by model 0123456789abcdef"):
        model.load_dataset_embeddings(other)
    narrow = DatasetEmbeddings(ctx[:, :32], model.fingerprint, "search_document: ", 0).save(
        tmp_path / "narrow.npz")
    with pytest.raises(ValueError, match=r"shape \(512, 32\)"):
        model.load_dataset_embeddings(narrow)
    nan = ctx.copy()
    nan[4] = np.nan
    with pytest.raises(ValueError, match=r"row\(s\) \[4\]"):
        model.load_dataset_embeddings(DatasetEmbeddings(nan, model.fingerprint, "p", 0).save(
            tmp_path / "nan.npz"))


def test_default_plan_per_platform(model, monkeypatch):
    """Half the device's memory at the recorded bytes per token of its kind and kernel (a
    table of made-up numbers here: scripts/aot_report.py --planner writes the real one)."""
    monkeypatch.setattr(buckets, "BYTES_PER_TOKEN", {
        "NVIDIA H100 80GB HBM3": {"cudnn": 256 * 1024, "xla": 512 * 1024},
        "TPU v5 lite": {"splash": 128 * 1024}, "TPU v6 lite": {"splash": 96 * 1024}})
    assert model.plan == BucketPlan() == default_plan("cpu", None, 8)
    h100 = default_plan("gpu", 80 * 2 ** 30, device_kind="NVIDIA H100 80GB HBM3",
                        kernel="cudnn")  # 40 GiB / 256 KiB = 163840: clamped
    assert (h100.tokens_per_batch, h100.max_batch, h100.lengths) == (65536, 1024,
                                                                     BucketPlan().lengths)
    assert h100.batch_size(16, 1, 520) == 122  # queries after the 520-token prefix
    # 16 GiB per device (TPU v5e): 8 GiB / 128 KiB = 65536 tokens, times 4 devices.
    v5e = default_plan("tpu", 16 * 2 ** 30, devices=4, device_kind="TPU v5 lite",
                       kernel="splash")
    assert v5e.tokens_per_batch == 4 * 65536 and v5e.max_batch == 4 * 1024
    assert v5e.lengths == (128, 256, 384, 512)
    # The xla kernel's 512 KiB: 8 GiB / 512 KiB = 16384 tokens.
    assert default_plan("gpu", 16 * 2 ** 30, device_kind="NVIDIA H100 80GB HBM3").\
        tokens_per_batch == 16384
    # An unknown kind takes its platform's largest (512 KiB): memory not reported, 16 GiB.
    assert default_plan("gpu", None, device_kind="NVIDIA A100").tokens_per_batch == 16384
    assert default_plan("tpu", 16 * 2 ** 30, device_kind="TPU v4",  # 8 GiB / 128 KiB
                        kernel="splash").tokens_per_batch == 65536
    assert default_plan("gpu", 2 * 2 ** 30, device_kind="NVIDIA H100 80GB HBM3",
                        kernel="cudnn").tokens_per_batch == 8192  # the floor
    assert device_memory(model.mesh.devices.flat[0]) is None  # CPU reports none


@pytest.mark.parametrize("in_flight", [0, 1, None])
def test_bounded_prefetch_same_results(model, ctx, random_docs, in_flight):
    """Batches are read back in order, at most `in_flight + 1` dispatched and unread (None:
    all dispatched first), and the rows are those of the default window."""
    runner, prefix = model.runner, model.context(ctx).prefix
    token_ids = model.tokenizer.encode([d[: (i * 37) % 700] for i, d in
                                        enumerate(random_docs[:30])])
    plan = BucketPlan(tokens_per_batch=2048)
    events, stage = [], runner.second(prefix)

    def counted_stage(ids, mask):
        events.append("dispatch")
        return stage(ids, mask)

    kw = dict(plan=plan, pad_id=model.backbone_config.pad_token_id, width=64,
              extra_len=prefix.embeds.shape[-2])
    expected = runner.run_buckets(token_ids, stage, **kw)
    progress = []
    got = runner.run_buckets(token_ids, counted_stage, in_flight=in_flight,
                             progress=lambda n: (progress.append(n), events.append("read")),
                             **kw)
    np.testing.assert_array_equal(got, expected)
    assert sum(progress) == len(token_ids)
    unread = np.cumsum([1 if e == "dispatch" else -1 for e in events])
    n_batches = events.count("dispatch")
    assert n_batches >= 4 and unread[-1] == 0
    assert unread.max() == (n_batches if in_flight is None else in_flight + 1)
