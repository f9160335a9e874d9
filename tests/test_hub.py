"""The Hugging Face hub, both ways.

Offline (always run): huggingface_hub's network calls (`snapshot_download`,
`HfApi.model_info`, `create_repo`, `create_branch`, `upload_folder`) are replaced by a fake
hub that serves synthetic checkpoints from local folders and records every call, so
everything up to the network is real: `cde_jax.load("owner/name", revision=...)` resolves,
downloads (configs, safetensors, tokenizer; never code), converts once into the cache and
reuses it; `save_pretrained` writes the released layout that cde_jax and the PyTorch
reference both load; `push_to_hub` uploads it; the MTEB wrapper takes `revision`.

Opt-in, needs the real hub (`pytest -m hub tests/test_hub.py` or CDE_HUB_TESTS=1; downloads
~1.2 GB of weights and the natural-questions dataset): jxm/cde-small-v2 loaded by hub id
reproduces docs/model.md §10 (sentence-transformers' integration test) within 1e-3. It is
skipped with the reason otherwise or when the hub is unreachable: a skip is never a pass.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import max_rel_err
from safetensors.numpy import load_file
from torch_reference import TorchCde

import cde_jax
from cde_jax import convert, hub
from cde_jax.convert import CheckpointError
from cde_jax.convert.source import HUB_PATTERNS
from cde_jax.outputs import OutputExistsError

REPO = "jxm/cde-small-v2"
DATASET = "sentence-transformers/natural-questions"
EXPECTED = [[0.8778, 0.7851, 0.7810, 0.7781, 0.7966],
            [0.7916, 0.8648, 0.7845, 0.7865, 0.8136]]
RELEASED_LAYOUT = {"model.safetensors", "config.json", "modernbert_config.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
MAIN, V1 = "a" * 40, "b" * 40
TEXTS = ["what is a contextual document embedding?", "search engines rank documents",
         "the cat sat on the mat"]


class FakeHub:
    """Repos as local folders, one per (repo id, commit); records every call."""

    def __init__(self, root: Path):
        self.root, self.calls, self.refs, self.online = root, [], {}, True

    def add(self, repo_id: str, folder: Path, commit: str, *refs: str) -> None:
        shutil.copytree(folder, self.root / "repos" / repo_id / commit)
        for ref in refs:
            self.refs[(repo_id, ref)] = commit

    def model_info(self, api, repo_id, *, revision=None, **kw):
        self.calls.append(("model_info", repo_id, revision))
        if not self.online:
            raise ConnectionError("offline")
        return types.SimpleNamespace(sha=self.refs[(repo_id, revision or "main")])

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, **kw):
        """huggingface_hub's filtering: only the files matching `allow_patterns`."""
        self.calls.append(("snapshot_download", repo_id, revision, tuple(allow_patterns)))
        if not self.online:
            raise ConnectionError("offline")
        commit = self.refs.get((repo_id, revision), revision)
        src, out = self.root / "repos" / repo_id / commit, self.root / "cache" / repo_id / commit
        out.mkdir(parents=True, exist_ok=True)
        for file in src.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copyfile(file, out / file.name)
        return str(out)

    def downloads(self) -> list:
        return [c for c in self.calls if c[0] == "snapshot_download"]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, synthetic):
    """A fake hub serving the tiny synthetic checkpoint (plus code and a README, which must
    not be downloaded) as owner/cde-tiny: main -> MAIN, tag v1 -> V1 (seed 1)."""
    import huggingface_hub

    fake = FakeHub(tmp_path / "hub")
    for commit, seed, refs in ((MAIN, 0, ("main",)), (V1, 1, ("v1",))):
        repo = tmp_path / f"repo-{seed}"
        shutil.copytree(synthetic(seed=seed)[0], repo)
        (repo / "modeling_cde.py").write_text("raise SystemExit('code must never be fetched')\n")
        (repo / "README.md").write_text("# a model card\n")
        fake.add("owner/cde-tiny", repo, commit, *refs)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda api, *a, **kw: fake.model_info(api, *a, **kw))
    monkeypatch.setenv(hub.CONVERTED_ENV, str(tmp_path / "converted"))
    conversions = []
    real_convert = convert.convert
    monkeypatch.setattr(convert, "convert",
                        lambda *a, **kw: conversions.append((a, kw)) or real_convert(*a, **kw))
    fake.conversions = conversions
    return fake


@pytest.fixture(scope="module")
def reference(synthetic):
    """The released synthetic checkpoint loaded directly, and its dataset embeddings."""
    model = cde_jax.load(synthetic()[0])
    return model, model.embed_minicorpus(TEXTS * 3, batch_size=8)


def embeddings(model, dataset_md) -> np.ndarray:
    return model.encode(TEXTS, prompt_name="query", dataset_embeddings=dataset_md, batch_size=8)


def test_hub_id_is_converted_once_then_reused(fake_hub, reference, tmp_path):
    ref_model, dataset_md = reference
    model = cde_jax.load("owner/cde-tiny")
    snapshot = tmp_path / "converted" / "models--owner--cde-tiny" / "snapshots" / MAIN
    assert convert.is_converted(snapshot)
    meta = json.loads((snapshot / "cde_jax.json").read_text())
    assert meta["source"] == f"owner/cde-tiny@{MAIN}"
    assert (tmp_path / "converted/models--owner--cde-tiny/refs/main").read_text() == MAIN + "\n"
    # Only configs, safetensors and tokenizer files, at the resolved commit: never code.
    assert fake_hub.downloads() == [("snapshot_download", "owner/cde-tiny", MAIN,
                                     tuple(HUB_PATTERNS))]
    downloaded = {p.name for p in (tmp_path / "hub/cache/owner/cde-tiny" / MAIN).iterdir()}
    assert downloaded == RELEASED_LAYOUT
    assert len(fake_hub.conversions) == 1
    assert model.fingerprint == ref_model.fingerprint
    np.testing.assert_array_equal(embeddings(model, dataset_md),
                                  embeddings(ref_model, dataset_md))

    again = cde_jax.load("owner/cde-tiny", revision="main")  # asks the hub, converts nothing
    assert len(fake_hub.conversions) == 1 and len(fake_hub.downloads()) == 1
    assert [c[0] for c in fake_hub.calls] == ["model_info", "snapshot_download", "model_info"]
    np.testing.assert_array_equal(embeddings(again, dataset_md), embeddings(model, dataset_md))

    fake_hub.online = False  # offline: the revision resolves through refs/
    offline = cde_jax.load("owner/cde-tiny")
    assert offline.fingerprint == model.fingerprint and len(fake_hub.conversions) == 1
    with pytest.raises(CheckpointError, match=r"could not resolve 'owner/cde-tiny' at revision "
                                              r"'v1' .*ConnectionError: offline.*never converted"):
        cde_jax.load("owner/cde-tiny", revision="v1")


def test_revisions_are_separate_conversions(fake_hub, reference, tmp_path):
    ref_model, dataset_md = reference
    v1 = cde_jax.load("owner/cde-tiny", revision="v1")
    by_commit = cde_jax.load("owner/cde-tiny", revision=V1)  # a commit: no lookup needed
    main = cde_jax.load("owner/cde-tiny")
    assert [c[2] for c in fake_hub.calls if c[0] == "model_info"] == ["v1", None]
    assert [kw["revision"] for _, kw in fake_hub.conversions] == [V1, MAIN]
    assert sorted(p.name for p in (tmp_path / "converted/models--owner--cde-tiny/snapshots")
                  .iterdir()) == [MAIN, V1]
    assert v1.fingerprint == by_commit.fingerprint != main.fingerprint
    assert main.fingerprint == ref_model.fingerprint
    assert np.abs(embeddings(v1, dataset_md) - embeddings(main, dataset_md)).max() > 1e-3


def test_revision_errors(fake_hub, synthetic):
    with pytest.raises(CheckpointError, match="revision= applies to hub ids"):
        cde_jax.load(synthetic()[1], revision="main")
    with pytest.raises(CheckpointError, match="not a hub id"):
        cde_jax.load("no/such/dir")
    assert fake_hub.calls == []


def test_convert_command_from_the_hub(fake_hub, tmp_path, capsys):
    from cde_jax import cli

    out = tmp_path / "cde-tiny-v1"
    assert cli.main(["convert", "owner/cde-tiny", str(out), "--revision", "v1"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert fake_hub.downloads() == [("snapshot_download", "owner/cde-tiny", "v1",
                                     tuple(HUB_PATTERNS))]
    assert json.loads((out / "cde_jax.json").read_text())["source"] == "owner/cde-tiny@v1"
    assert cde_jax.load(out).fingerprint == cde_jax.load("owner/cde-tiny", revision="v1"
                                                         ).fingerprint


def test_save_pretrained_round_trip(synthetic, reference, tmp_path):
    """save_pretrained -> the released layout: cde_jax loads it to the same embeddings
    (exactly), the PyTorch reference to within 1e-5, and the tensors are the original's."""
    released, converted = synthetic()
    _, dataset_md = reference
    model = cde_jax.load(converted)
    out = model.save_pretrained(tmp_path / "saved")
    assert {p.name for p in out.iterdir()} == RELEASED_LAYOUT
    original = load_file(released / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, array in original.items():
        np.testing.assert_array_equal(saved[name], array, err_msg=name)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (released / "config.json").read_text())
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        model.save_pretrained(out)
    model.save_pretrained(out, overwrite=True)

    reloaded = cde_jax.load(out)
    assert reloaded.fingerprint == model.fingerprint  # dataset-embeddings files stay valid
    tokens = reloaded.tokenizer(["search_document: " + t for t in TEXTS])
    first = reloaded.first_stage(*tokens)
    np.testing.assert_array_equal(first, model.first_stage(*tokens))
    np.testing.assert_array_equal(embeddings(reloaded, dataset_md), embeddings(model, dataset_md))

    torch_model = TorchCde(out)
    assert max_rel_err(first, torch_model.first_stage(*tokens)) <= 1e-5
    queries = reloaded.tokenizer(["search_query: " + t for t in TEXTS])
    assert max_rel_err(reloaded.second_stage(*queries, dataset_md),
                       torch_model.second_stage(*queries, dataset_md)) <= 1e-5


def test_push_to_hub_uploads_the_released_layout(fake_hub, reference, tmp_path, monkeypatch):
    """Up to the network: create_repo, create_branch and upload_folder get the right
    arguments and a folder that loads back (also by hub id) to the same embeddings."""
    import huggingface_hub

    ref_model, dataset_md = reference
    uploaded = tmp_path / "uploaded"

    def record(name):
        def method(api, *args, **kw):
            fake_hub.calls.append((name, api.token, args, kw))
            if name == "upload_folder":
                shutil.copytree(kw["folder_path"], uploaded, dirs_exist_ok=True)
                return types.SimpleNamespace(oid="c" * 40, commit_url="https://hub/commit")
            return None
        return method

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
    info = ref_model.push_to_hub("me/pushed", private=True, token="hf_x", revision="exp",
                                 commit_message="first")
    assert info.oid == "c" * 40
    create, branch, upload = fake_hub.calls
    assert create == ("create_repo", "hf_x", ("me/pushed",),
                      dict(private=True, repo_type="model", exist_ok=True))
    assert branch == ("create_branch", "hf_x", ("me/pushed",),
                      dict(branch="exp", repo_type="model", exist_ok=True))
    kw = upload[3]
    assert (upload[1], kw["repo_id"], kw["repo_type"], kw["revision"], kw["commit_message"],
            kw["create_pr"]) == ("hf_x", "me/pushed", "model", "exp", "first", False)
    assert not Path(kw["folder_path"]).exists()  # a temporary dir, removed after the upload
    assert {p.name for p in uploaded.iterdir()} == RELEASED_LAYOUT | {"README.md"}
    card = (uploaded / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: cde-jax\n")
    assert 'cde_jax.load("me/pushed")' in card and cde_jax.__version__ in card
    np.testing.assert_array_equal(embeddings(cde_jax.load(uploaded), dataset_md),
                                  embeddings(ref_model, dataset_md))

    fake_hub.add("me/pushed", uploaded, "c" * 40, "exp")  # and back from the (fake) hub
    back = cde_jax.load("me/pushed", revision="exp")
    np.testing.assert_array_equal(embeddings(back, dataset_md), embeddings(ref_model, dataset_md))

    fake_hub.calls.clear()
    ref_model.push_to_hub("me/pushed", create_pr=True)  # a PR needs no branch
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[1][3]["create_pr"] is True and fake_hub.calls[1][3]["revision"] is None


def test_mteb_wrapper_takes_a_revision(fake_hub, reference):
    from cde_jax.evaluation.mteb import CdeMtebModel

    wrapper = CdeMtebModel("owner/cde-tiny", "v1")
    assert wrapper.name == "cde-jax/cde-tiny"
    assert wrapper.model.fingerprint == cde_jax.load("owner/cde-tiny", revision=V1).fingerprint
    assert wrapper.model.fingerprint != reference[0].fingerprint
    assert [kw["revision"] for _, kw in fake_hub.conversions] == [V1]
    with pytest.raises(ValueError, match="revision applies to a hub id"):
        CdeMtebModel(reference[0], "v1")


# --- the real hub (opt-in) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_hub(request):
    markexpr = request.config.getoption("markexpr") or ""
    if os.environ.get("CDE_HUB_TESTS") != "1" and not re.search(r"(?<!not )\bhub\b", markexpr):
        pytest.skip("opt-in: run with `pytest -m hub` or CDE_HUB_TESTS=1 (downloads ~1.2 GB)")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(REPO, timeout=15)
    except Exception as e:  # offline, DNS, proxy, HF_HUB_OFFLINE: all mean "cannot check"
        pytest.skip(f"Hugging Face hub unreachable ({type(e).__name__}: {e})")


def similarity_matrix(model, answers: list[str], queries: list[str]) -> np.ndarray:
    """docs/model.md §10's procedure: the last 512 answers as the minicorpus, embedded in
    their order (the reference does not resample them), then cosine of the first 2 queries x 5
    answers."""
    dataset_embeddings = model.embed_minicorpus(answers[-model.config.transductive_corpus_size:])
    docs = model.encode(answers[:5], prompt_name="document",
                        dataset_embeddings=dataset_embeddings)
    queries = model.encode(queries[:2], prompt_name="query",
                           dataset_embeddings=dataset_embeddings)
    return queries @ docs.T


@pytest.mark.hub
def test_real_weights_reproduce_spec_section_6(real_hub, tmp_path_factory, monkeypatch):
    from datasets import load_dataset

    monkeypatch.setenv(hub.CONVERTED_ENV, str(tmp_path_factory.mktemp("converted")))
    model = cde_jax.load(REPO)  # downloaded, converted into the cache, loaded
    data = load_dataset(DATASET, split="train")
    sims = similarity_matrix(model, list(data["answer"]), list(data["query"][:2]))
    assert sims.shape == (2, 5)
    np.testing.assert_allclose(sims, EXPECTED, rtol=0, atol=1e-3)
