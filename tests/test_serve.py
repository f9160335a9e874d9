"""`cde-jax serve` as a real server process on 127.0.0.1, started once per module on the tiny
checkpoint with two contexts and a key: the openai client (api_key=) and TEI's /embed against
`Context.encode`, every error answer, keys, budgets, contexts over the API, a full queue, a
client that goes away, batches formed while the device is busy, no compilation after
start-up; a second server (key file, TLS, public metrics, a small token budget); the
README's commands on a third; SIGTERM under load (last: it stops the server). The soak is
tests/test_serve_soak.py."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import max_rel_err
from serve_helpers import metric_values, start, stop, wait_until

import cde_jax
from cde_jax import cli
from cde_jax.prompts import DOCUMENT, QUERY

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ_LENGTH, MAX_QUEUE, MAX_INPUTS, PAYLOAD_LIMIT = 32, 64, 48, 262144
KEY = "test-key-0123456789abcdef"
QUERIES = ["what is a contextual document embedding?", "jax", "how do length buckets work "
           "when the texts of one batch have many different lengths in tokens?"]
LONG = " ".join(["tokens"] * 100)  # over MAX_SEQ_LENGTH
PARITY = 1e-6


def readme_blocks() -> list[tuple[str, str]]:
    """[(language, code)] of the fenced blocks of the README's "Serve" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Serve\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, ctx_npz, tmp_path_factory):
    """The server, listening, with a key (from $CDE_JAX_API_KEY) and two contexts; with its
    own compilation cache, so that every program it compiles counts in its metrics (a
    program loaded from a shared cache would not)."""
    from cde_jax.convert import read_converted
    from cde_jax.minicorpus import DatasetEmbeddings

    tmp = tmp_path_factory.mktemp("serve")
    other = DatasetEmbeddings(np.random.default_rng(1).standard_normal((512, 64)).astype(
        np.float32), read_converted(tiny_checkpoint[1]).fingerprint, DOCUMENT, 0)
    argv = ["serve", "--model", str(tiny_checkpoint[1]), "--port", "0",
            "--context", f"corpus={ctx_npz}", "--context", f"other={other.save(tmp / 'o.npz')}",
            "--context-dir", str(tmp / "contexts"), "--max-seq-length", str(MAX_SEQ_LENGTH),
            "--max-queue", str(MAX_QUEUE), "--max-client-batch-size", str(MAX_INPUTS),
            "--payload-limit", str(PAYLOAD_LIMIT)]
    process, url = start(argv, tmp / "server.log", {"CDE_JAX_CACHE_DIR": str(tmp / "xla"),
                                                    "CDE_JAX_API_KEY": KEY})
    http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    wait_until(lambda: http.get("/health").status_code == 200, what="/health")
    yield {"process": process, "url": url, "log": tmp / "server.log", "other": tmp / "o.npz",
           "http": http, "argv": argv, "tmp": tmp, "ctx": Path(ctx_npz)}
    http.close()
    stop(process)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    model = cde_jax.load(tiny_checkpoint[1])
    model.max_seq_length = MAX_SEQ_LENGTH
    return model


@pytest.fixture(scope="module")
def contexts(model, ctx_npz, server):
    return {"corpus": model.context(ctx_npz), "other": model.context(server["other"])}


def post(server, route: str, body) -> httpx.Response:
    kw = {"json": body} if not isinstance(body, bytes) else {
        "content": body, "headers": {"Content-Type": "application/json"}}
    return server["http"].post(route, **kw)


def metrics(server) -> dict[str, float]:
    return metric_values(server["http"])


def client(server, api_key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=api_key, max_retries=0)


def rows(response) -> np.ndarray:
    return np.array([item.embedding for item in response.data], np.float32)


def test_openai_client_gets_the_embeddings_of_encode(server, model, contexts):
    api = client(server)
    assert [m.id for m in api.models.list()] == ["corpus", "other"]
    queries = contexts["corpus"].encode_query(QUERIES)
    floats = api.embeddings.create(model="corpus", input=QUERIES, encoding_format="float")
    assert max_rel_err(rows(floats), queries) <= PARITY
    assert [item.index for item in floats.data] == [0, 1, 2] and floats.model == "corpus"
    tokens = sum(map(len, model.tokenize(QUERIES, QUERY)))
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (tokens, tokens)
    # the client's default: base64 on the wire, decoded by the client
    assert max_rel_err(rows(api.embeddings.create(model="corpus", input=QUERIES)),
                       queries) <= PARITY
    documents = api.embeddings.create(model="other", input=QUERIES,
                                      extra_body={"prompt_name": "document"})
    assert max_rel_err(rows(documents), contexts["other"].encode_document(QUERIES)) <= PARITY
    ids = api.embeddings.create(model="corpus", input=model.tokenize(QUERIES, QUERY))
    assert max_rel_err(rows(ids), queries) <= PARITY
    one = api.embeddings.create(model="corpus", input=QUERIES[0], dimensions=16)
    cut = queries[0, :16] / np.linalg.norm(queries[0, :16])
    assert max_rel_err(rows(one)[0], cut) <= PARITY


def test_base64_is_little_endian_float32(server, contexts):
    body = post(server, "/v1/embeddings", {"model": "corpus", "input": QUERIES,
                                           "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(item["embedding"]), "<f4")
                        for item in body["data"]])
    assert max_rel_err(decoded, contexts["corpus"].encode_query(QUERIES)) <= PARITY


def test_tei_embed(server, contexts):
    corpus = contexts["corpus"]
    answer = post(server, "/embed", {"inputs": QUERIES})
    assert answer.status_code == 200 and len(answer.json()) == 3
    assert max_rel_err(answer.json(), corpus.encode_query(QUERIES)) <= PARITY
    raw = post(server, "/embed", {"inputs": QUERIES[1], "normalize": False,
                                  "prompt_name": "document", "model": "other"}).json()
    expected = contexts["other"].encode_document(QUERIES[1:2], normalize_embeddings=False)
    assert max_rel_err(raw, expected) <= PARITY


def test_long_inputs_are_cut_or_refused(server, contexts):
    truncated = metrics(server)["cde_serve_truncated_texts_total"]
    cut = post(server, "/v1/embeddings", {"model": "corpus", "input": [LONG]})
    assert metrics(server)["cde_serve_truncated_texts_total"] == truncated + 1
    assert max_rel_err([cut.json()["data"][0]["embedding"]],
                       contexts["corpus"].encode_query([LONG])) <= PARITY
    assert cut.json()["usage"]["prompt_tokens"] == MAX_SEQ_LENGTH
    refused = post(server, "/v1/embeddings", {"model": "corpus", "input": ["a", LONG],
                                              "truncate": False})
    assert refused.status_code == 413
    assert refused.json() == {"error": {
        "message": "input[1] is longer than max_seq_length (32 tokens, prompt, [CLS] and "
                   "[SEP] included): shorten it, or send truncate=true to cut it",
        "type": "invalid_request_error", "param": "input", "code": "context_length_exceeded"}}
    tei = post(server, "/embed", {"inputs": [LONG], "truncate": False})
    assert tei.status_code == 413 and tei.json()["error_type"] == "validation"
    assert tei.json()["error"].startswith("inputs[0] is longer than max_seq_length (32 tokens")


def openai_error(status, message, param=None, code=None, type="invalid_request_error"):
    return status, {"error": {"message": message, "type": type, "param": param, "code": code}}


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "corpus", "input": ["a"', openai_error(
        400, "the request body is not valid JSON: Expecting ',' delimiter",
        code="invalid_json")),
    "not an object": (b'["a"]', openai_error(
        400, "the request body must be a JSON object: Input should be a valid dictionary or "
             "object to extract fields from")),
    "empty input": ({"model": "corpus", "input": []}, openai_error(
        400, "input is empty: send at least one text", "input")),
    "empty string": ({"model": "corpus", "input": ["a", ""]}, openai_error(
        400, "input[1] must be a non-empty string or array of token ids, got an empty string",
        "input")),
    "mixed input": ({"model": "corpus", "input": ["a", [1, 2]]}, openai_error(
        400, "input mixes texts and token ids", "input")),
    "unknown model": ({"model": "nope", "input": "a"}, openai_error(
        404, "model 'nope' is not served here; the models (contexts) are: corpus, other "
             "(GET /v1/models)", "model", "model_not_found")),
    "missing model": ({"input": "a"}, openai_error(400, "model: Field required", "model")),
    "unknown field": ({"model": "corpus", "input": "a", "temperature": 1}, openai_error(
        400, "temperature: Extra inputs are not permitted", "temperature")),
    "bad format": ({"model": "corpus", "input": "a", "encoding_format": "int8"}, openai_error(
        400, "encoding_format: Input should be 'float' or 'base64'", "encoding_format")),
    "bad role": ({"model": "corpus", "input": "a", "prompt_name": "passage"}, openai_error(
        400, "prompt_name: Input should be 'query' or 'document'", "prompt_name")),
    "too many dimensions": ({"model": "corpus", "input": "a", "dimensions": 65}, openai_error(
        400, "dimensions must be in 1..64, got 65", "dimensions")),
    "token id outside the vocabulary": ({"model": "corpus", "input": [[1, 50368]]},
                                        openai_error(400, "input[0] has token id 50368, "
                                                     "outside the vocabulary [0, 50368)",
                                                     "input")),
    "role with token ids": ({"model": "corpus", "input": [[1, 2]], "prompt_name": "query"},
                            openai_error(400, "prompt_name does not apply to token ids: "
                                         "they are embedded as given, prompt included",
                                         "prompt_name")),
    "too many inputs": ({"model": "corpus", "input": ["a"] * (MAX_INPUTS + 1)},
                        openai_error(413, "input has 49 items, more than this server takes in "
                                     "one request (--max-client-batch-size 48): split it",
                                     "input", "too_many_inputs")),
    "no texts nor embeddings": ({"name": "x"}, openai_error(
        400, "send one of texts (the corpus) or dataset_embeddings (base64 float32)", "texts"),
        "/v1/contexts"),
    "bad context name": ({"name": "-x", "texts": ["a"]}, openai_error(
        400, "name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._:/-]*$'", "name"),
        "/v1/contexts"),
    "embeddings not base64": ({"name": "x", "dataset_embeddings": "%%"}, openai_error(
        400, "dataset_embeddings is not base64: Only base64 data is allowed",
        "dataset_embeddings"), "/v1/contexts"),
    "embeddings of another width": ({"name": "x", "dataset_embeddings": base64.b64encode(
        b"\0" * 4 * 65).decode()}, openai_error(
        400, "dataset_embeddings holds 260 bytes: expected rows of 64 little-endian float32 "
             "(256 bytes each)", "dataset_embeddings"), "/v1/contexts"),
    "embeddings of other rows": ({"name": "x", "dataset_embeddings": base64.b64encode(
        b"\0" * 4 * 64 * 3).decode()}, openai_error(
        400, "dataset_embeddings: 3 rows of dataset embeddings; this model's minicorpus has "
             "512"), "/v1/contexts"),
    "context exists": ({"name": "corpus", "texts": ["a"]}, openai_error(
        409, "context 'corpus' exists: DELETE /v1/contexts/corpus first", "name",
        "context_exists"), "/v1/contexts"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=str)
def test_bad_requests_get_openai_errors(server, case):
    body, (status, expected), *route = BAD_REQUESTS[case]
    answer = post(server, route[0] if route else "/v1/embeddings", body)
    assert (answer.status_code, answer.json()) == (status, expected)


@pytest.mark.parametrize("body,message", [
    ({"inputs": []}, "inputs is empty: send at least one text"),
    ({"inputs": "a", "model": "nope"}, "model 'nope' is not served here; the models "
                                       "(contexts) are: corpus, other (GET /v1/models)"),
    (b"{", "the request body is not valid JSON: Expecting property name enclosed in double "
           "quotes"),
], ids=["empty", "unknown model", "malformed JSON"])
def test_bad_requests_get_tei_errors(server, body, message):
    answer = post(server, "/embed", body)
    assert answer.status_code in (400, 404)
    assert answer.json() == {"error": message, "error_type": "validation"}


def test_the_openai_client_raises_what_openai_raises(server):
    with pytest.raises(openai.NotFoundError) as error:
        client(server).embeddings.create(model="nope", input="a")
    assert error.value.code == "model_not_found" and error.value.param == "model"


def raw_post(server, body: dict) -> socket.socket:
    """A request sent on a socket of our own, so that the test can hang up on it."""
    host, port = server["url"].removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                 b"application/json\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n"
                 b"\r\n%s" % (host.encode(), KEY.encode(), len(data), data))
    return sock


def run_large(pool: ThreadPoolExecutor, server):
    """A request of MAX_INPUTS texts of the largest bucket (7 batches of 7 texts, the
    default budget's), running once this returns."""
    large = pool.submit(post, server, "/v1/embeddings", {
        "model": "other", "input": [f"{i} {LONG}" for i in range(MAX_INPUTS)]})
    wait_until(lambda: metrics(server)["cde_serve_running_texts"] > 0,
               what="the large request to run")
    return large


def test_while_the_device_is_busy(server, contexts):
    """With the device busy on a large request (split in batches by the token budget):
    one that does not fit the queue gets 429 with Retry-After; a client that hangs up while
    queued is dropped without running; requests that arrive meanwhile are taken together
    as soon as the large one's last part is. Each step waits for the queue to show the one
    before, so nothing depends on timing but the large request outlasting a few local round
    trips (the 429 needs fewer than 32 of its texts done, 4 batches)."""
    before = metrics(server)
    with ThreadPoolExecutor(10) as pool:
        large = run_large(pool, server)
        with pytest.raises(openai.RateLimitError) as error:
            client(server).embeddings.create(model="corpus", input=["q"] * MAX_INPUTS)
        with raw_post(server, {"model": "corpus", "input": ["never answered"] * 5}):
            wait_until(lambda: metrics(server)["cde_serve_queue_requests"] == 2,
                       what="the request that hangs up to queue")
        wait_until(lambda: metrics(server)["cde_serve_cancelled_requests_total"]
                   == before["cde_serve_cancelled_requests_total"] + 1, what="the hang-up")
        small = [pool.submit(post, server, "/embed", {"inputs": QUERIES[i % 3]})
                 for i in range(6)]
        answers = [future.result() for future in (large, *small)]
    assert int(error.value.response.headers["Retry-After"]) >= 1
    assert (error.value.type, error.value.code) == ("rate_limit_error", "queue_full")
    assert [answer.status_code for answer in answers] == [200] * 7
    expected = contexts["corpus"].encode_query(QUERIES)
    for i, answer in enumerate(answers[1:]):
        assert max_rel_err(answer.json(), expected[i % 3:i % 3 + 1]) <= PARITY
    assert max_rel_err([d["embedding"] for d in answers[0].json()["data"]],
                       contexts["other"].encode_query(
                           [f"{i} {LONG}" for i in range(MAX_INPUTS)])) <= PARITY
    ran = {key: metrics(server)[key] - before[key]
           for key in ("cde_serve_batch_texts_count", "cde_serve_batch_texts_sum")}
    # the 5 texts of the request that hung up never ran; the 6 small ones ran in at most 2
    # batches (7 of the large request's alone; with the last, or after it)
    assert ran["cde_serve_batch_texts_sum"] == MAX_INPUTS + 6
    assert 7 + 1 <= ran["cde_serve_batch_texts_count"] <= 7 + 2


def test_no_request_compiles(server):
    """Every shape was compiled at start-up: requests of both buckets at every batch size,
    both contexts, both routes, texts and token ids compile nothing (the server counts XLA
    compilations)."""
    compiled = metrics(server)["cde_serve_xla_compiles_total"]
    assert compiled >= 14  # the warm-up: the buckets 16 and 32 at 1 to 7 rows
    short, long = "w", " ".join(["w"] * 40)  # buckets 16 and 32 (cut)
    for n in (1, 2, 3, 5, 9):
        assert post(server, "/embed", {"inputs": [short] * n + [long] * n}).status_code == 200
    for model in ("corpus", "other"):
        assert post(server, "/v1/embeddings", {"model": model, "input": [short, long]}
                    ).status_code == 200
        assert post(server, "/embed", {"inputs": [[1] * 20], "model": model}).status_code == 200
    assert metrics(server)["cde_serve_xla_compiles_total"] == compiled


def test_a_lone_request_waits_for_no_batch(server):
    """Nothing else queued: the request is taken at once (no wait to fill a batch)."""
    before = metrics(server)
    assert post(server, "/embed", {"inputs": "alone"}).status_code == 200
    after = metrics(server)
    assert after["cde_serve_queue_seconds_count"] - before["cde_serve_queue_seconds_count"] == 1
    waited = after["cde_serve_queue_seconds_sum"] - before["cde_serve_queue_seconds_sum"]
    assert waited < 0.1


def test_any_number_of_texts_runs_in_compiled_sizes(server):
    """The CPU plan's 16-token batches hold 7 texts; every size up to that is compiled, and
    the batcher splits what it takes into the sizes the warm-up timed fastest: any number
    of texts runs, compiling nothing, padding at most what a split of them pads."""
    compiled = metrics(server)["cde_serve_xla_compiles_total"]
    for texts in (1, 3, 5, 6, 9):
        before = metrics(server)
        assert post(server, "/embed", {"inputs": ["q"] * texts}).status_code == 200
        after = metrics(server)
        assert (after["cde_serve_batch_texts_sum"] - before["cde_serve_batch_texts_sum"]
                == texts)
        assert 0 <= (after["cde_serve_padding_rows_total"]
                     - before["cde_serve_padding_rows_total"]) < 7
    assert metrics(server)["cde_serve_xla_compiles_total"] == compiled


@pytest.mark.parametrize("seconds,n,split", [
    (lambda s: 1.2 * s if s > 1 else 1.0, 5, [1] * 5),  # a CPU: a lone row is cheapest
    (lambda s: 1.0 + 0.01 * s, 9, [7, 2]),  # an accelerator: rows are nearly free
    (lambda s: 1.0 + 0.01 * s, 6, [6]),
], ids=["cpu-like", "accelerator-like", "one batch"])
def test_the_batcher_splits_by_the_warm_up_times(model, seconds, n, split):
    from cde_jax.serving.batcher import BatchShapes

    shapes = BatchShapes(model, prefix_length=520)
    assert shapes.sizes(16) == [1, 2, 3, 4, 5, 6, 7]
    shapes.seconds = {(16, s): seconds(s) for s in shapes.sizes(16)}
    assert sorted(shapes.split(16, n), reverse=True) == split


def test_payload_limit(server):
    """Bodies over --payload-limit get 413 before they are read: declared (Content-Length)
    or streamed (chunked, no length)."""
    big = json.dumps({"model": "corpus", "input": ["w " * 4000] * 40}).encode()
    assert len(big) > PAYLOAD_LIMIT
    declared = post(server, "/v1/embeddings", big)
    assert (declared.status_code, declared.json()) == openai_error(
        413, f"the request body has {len(big)} bytes, more than this server takes "
             f"(--payload-limit {PAYLOAD_LIMIT}): split the request", code="payload_too_large")
    streamed = server["http"].post("/embed", content=(big[i:i + 8192]
                                                      for i in range(0, len(big), 8192)))
    assert streamed.status_code == 413
    assert streamed.json()["error"].startswith("the request body has at least ")
    assert streamed.json()["error"].endswith(
        f" bytes, more than this server takes (--payload-limit {PAYLOAD_LIMIT}): split the "
        f"request")
    assert streamed.json()["error_type"] == "validation"


def unauthorized(message):
    return openai_error(401, message, code="invalid_api_key")


def test_every_route_but_health_needs_the_key(server):
    bare = httpx.Client(base_url=server["url"], timeout=60)
    assert bare.get("/health").status_code == 200
    for method, route in (("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/contexts"),
                          ("POST", "/v1/embeddings"), ("POST", "/embed"),
                          ("POST", "/v1/contexts"), ("DELETE", "/v1/contexts/corpus")):
        answer = bare.request(method, route, json={"model": "corpus", "input": "a"})
        assert (answer.status_code, answer.json()) == unauthorized(
            "no API key: send the header Authorization: Bearer KEY"), route
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        for header in (f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"Bearer {KEY[:-1]}"):
            answer = bare.request(method, route, json={"model": "corpus", "input": "a"},
                                  headers={"Authorization": header})
            assert (answer.status_code, answer.json()) == unauthorized(
                "the API key is not valid"), (route, header)
    with pytest.raises(openai.AuthenticationError) as error:
        client(server, api_key="wrong").embeddings.create(model="corpus", input="a")
    assert error.value.code == "invalid_api_key"
    assert server["http"].get("/v1/contexts").status_code == 200  # the key: in
    assert KEY not in server["log"].read_text()


def test_contexts_over_the_api(server, model, contexts):
    """A context from base64 dataset embeddings and one from texts: listed, served as
    `model.context(...)` makes them, saved in --context-dir as dataset-embeddings files
    (atomic: no temp file left), deleted (file too); a context being made does not hold up
    queries to the others."""
    from cde_jax.minicorpus import DatasetEmbeddings

    api, http, directory = client(server), server["http"], server["tmp"] / "contexts"
    rows_md = np.random.default_rng(5).standard_normal((512, 64)).astype(np.float32)
    made = http.post("/v1/contexts", json={"name": "org/uploaded", "dataset_embeddings":
                                           base64.b64encode(rows_md.tobytes()).decode()})
    assert (made.status_code, made.json()) == (201, {
        "id": "org/uploaded", "object": "context", "status": "ready", "rows": 512,
        "persisted": True})
    assert "org/uploaded" in [m.id for m in api.models.list()]
    got = rows(api.embeddings.create(model="org/uploaded", input=QUERIES))
    assert max_rel_err(got, model.context(rows_md).encode_query(QUERIES)) <= PARITY
    saved = DatasetEmbeddings.load(directory / "org%2Fuploaded.npz",
                                   fingerprint=model.fingerprint, width=64)
    assert np.array_equal(saved.embeddings, rows_md)

    texts = [f"document {i} about {QUERIES[i % 3]}" for i in range(600)]
    with ThreadPoolExecutor(1) as pool:
        making = pool.submit(http.post, "/v1/contexts", json={"name": "texts", "texts": texts,
                                                              "seed": 3})
        wait_until(lambda: {"id": "texts", "object": "context", "status": "making"}
                   in http.get("/v1/contexts").json()["data"], what="the context to be made")
        during = api.embeddings.create(model="corpus", input=QUERIES)  # not held up
        still_making = not making.done()
        busy = http.post("/v1/embeddings", json={"model": "texts", "input": "a"})
        assert making.result().status_code == 201, making.result().text
    assert still_making  # the query was answered while the context was being made
    assert max_rel_err(rows(during), contexts["corpus"].encode_query(QUERIES)) <= PARITY
    assert busy.status_code == 404 and "is still being made" in busy.json()["error"]["message"]
    expected = model.context(texts, seed=3).encode_document(QUERIES)
    got = api.embeddings.create(model="texts", input=QUERIES,
                                extra_body={"prompt_name": "document"})
    assert max_rel_err(rows(got), expected) <= PARITY
    listed = http.get("/v1/contexts").json()["data"]
    assert [c["id"] for c in listed] == ["corpus", "other", "org/uploaded", "texts"]
    assert sorted(p.name for p in directory.iterdir()) == ["org%2Fuploaded.npz", "texts.npz"]

    assert http.delete("/v1/contexts/org/uploaded").json() == {
        "id": "org/uploaded", "object": "context", "deleted": True}
    assert http.delete("/v1/contexts/texts").status_code == 200
    assert list(directory.iterdir()) == []
    gone = http.delete("/v1/contexts/texts")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert [m.id for m in api.models.list()] == ["corpus", "other"]


@pytest.mark.parametrize("argv,message", [
    ([], "give at least one --context NAME=dataset.npz, or --context-dir"),
    (["--context", "corpus"], "--context 'corpus': expected NAME=dataset.npz"),
    (["--context", "a=x.npz", "--context", "a=y.npz"], "--context 'a' is given twice"),
    (["--context", "a=x.npz", "--max-queue", "0"], "max_queue must be >= 1, got 0"),
    (["--context", "a=x.npz", "--ssl-certfile", "c.pem"],
     "give both --ssl-certfile and --ssl-keyfile, or neither"),
    (["--context", "a=x.npz", "--api-key-file", "/nonexistent/keys"],
     "--api-key-file /nonexistent/keys: cannot read it (FileNotFoundError)"),
    (["--context", "a=x.npz", "--api-key", "two words"],
     "API key #1 holds a space or an unprintable character (its value is not shown)"),
], ids=["no context", "no file", "twice", "no queue", "half of tls", "no key file", "bad key"])
def test_bad_command_lines_stop_before_loading(argv, message, capsys):
    assert cli.main(["serve", "--model", "never-loaded", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cde-jax serve: error: {message}") and err.count("\n") == 1, err
    assert "two words" not in err


def test_a_budget_under_one_text_stops_at_start(tiny_checkpoint, ctx_npz, capsys):
    argv = ["serve", "--model", str(tiny_checkpoint[1]), "--context", f"c={ctx_npz}",
            "--max-seq-length", "32", "--max-batch-tokens", "500"]
    assert cli.main(argv) == 2
    assert ("max_batch_tokens 500 is less than one text of max_seq_length: 552 positions "
            "(bucket 32 + the prefix's 520)") in capsys.readouterr().err


def self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True, timeout=60)
    return cert, key


def test_key_file_public_metrics_tls_and_a_token_budget(server, tiny_checkpoint, ctx_npz,
                                                        contexts, tmp_path):
    """A second server: keys from a file, /metrics public, TLS, and a budget of 2 texts
    (1100 positions: 2 x (16 + 520)) per batch: a request of 5 runs as 2 + 2 + 1."""
    import ssl

    (tmp_path / "keys").write_text("# the clients' keys\nkey-one\n\n  key-two  \n")
    cert, key = self_signed(tmp_path)
    process, url = start(
        ["serve", "--model", str(tiny_checkpoint[1]), "--context", f"corpus={ctx_npz}",
         "--port", "0", "--max-seq-length", "16", "--max-batch-tokens", "1100",
         "--api-key-file", str(tmp_path / "keys"), "--public-metrics", "--ssl-certfile",
         str(cert), "--ssl-keyfile", str(key), "--verbose"], tmp_path / "log",
        {"CDE_JAX_CACHE_DIR": str(server["tmp"] / "xla")}, scheme="https")
    try:
        assert url.startswith("https://127.0.0.1:")
        verify = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=url, verify=verify, timeout=60) as http:
            assert http.get("/metrics").status_code == 200  # public
            assert http.get("/v1/models").status_code == 401
            for k in ("key-one", "key-two"):
                assert http.get("/v1/models", headers={"Authorization": f"Bearer {k}"}
                                ).status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP is not served
                httpx.get(url.replace("https", "http") + "/health")
            before = metric_values(http)
            answer = http.post("/embed", json={"inputs": QUERIES[:2] + ["a", "b", "c"]},
                               headers={"Authorization": "Bearer key-two"})
            after = metric_values(http)
        assert answer.status_code == 200
        expected = contexts["corpus"].encode_query(QUERIES[:2] + ["a", "b", "c"])
        assert max_rel_err(answer.json(), expected) <= PARITY
        assert {k: after[k] - before[k] for k in ("cde_serve_batch_texts_count",
                                                   "cde_serve_batch_texts_sum")} == {
            "cde_serve_batch_texts_count": 3, "cde_serve_batch_texts_sum": 5}
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        log = (tmp_path / "log").read_text()
        assert '"GET /v1/models HTTP/1.1" 200' in log  # the access log is on...
        assert "key-one" not in log and "key-two" not in log  # ...and holds no key
    finally:
        stop(process)


def test_readme_commands(server, tmp_path, contexts, monkeypatch):
    """The README's Serve section, run: its `export` lines and `cde-jax serve` line (the
    checkpoint and context swapped for the tiny ones, --max-seq-length 32 added to compile
    less), then every other bash block (curl: embeddings, contexts) and the Python client
    example. Every JSON answer holds no error; the embeddings equal `encode`'s."""
    blocks = readme_blocks()
    serve_block = next(code for lang, code in blocks if "cde-jax serve" in code)
    lines = serve_block.replace("\\\n", " ").splitlines()
    exports = "\n".join(line.split("#")[0] for line in lines if line.startswith("export "))
    env = dict(line.split("=", 1) for line in subprocess.run(
        ["bash", "-c", f"{exports}\nenv"], capture_output=True, text=True, check=True,
        env={}).stdout.splitlines() if "=" in line and line.startswith("CDE_JAX"))
    line = next(line for line in lines if line.startswith("cde-jax serve"))
    (tmp_path / "contexts").mkdir()
    (tmp_path / "contexts" / "corpus.npz").write_bytes(server["ctx"].read_bytes())
    swap = {"M": server["argv"][2], "8080": "0", "contexts": str(tmp_path / "contexts"),
            "corpus=corpus.npz": f"corpus={tmp_path / 'contexts' / 'corpus.npz'}"}
    argv = [swap.get(arg, arg) for arg in shlex.split(line.split("#")[0])][1:]
    process, url = start(argv + ["--max-seq-length", str(MAX_SEQ_LENGTH)], tmp_path / "log",
                         {**env, "CDE_JAX_CACHE_DIR": str(server["tmp"] / "xla")})
    try:
        port = url.rsplit(":", 1)[1]
        answers = []
        for lang, code in blocks:
            if lang != "bash" or "cde-jax serve" in code:
                continue
            done = subprocess.run(["bash", "-ec", code.replace("127.0.0.1:8080",
                                                               f"127.0.0.1:{port}")],
                                  capture_output=True, text=True, timeout=120,
                                  env={**os.environ, **env})
            assert done.returncode == 0, done.stderr
            text, decoder = done.stdout.strip(), json.JSONDecoder()
            while text:
                answer, end = decoder.raw_decode(text)
                answers.append(answer)
                text = text[end:].strip()
        assert answers and not [a for a in answers if "error" in a], answers
        expected = contexts["corpus"].encode_query(["what is a cde?"])
        assert max_rel_err([answers[0]["data"][0]["embedding"]], expected) <= PARITY
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        namespace = {}
        python = next(code for lang, code in blocks if lang == "python")
        exec(python.replace("127.0.0.1:8080", f"127.0.0.1:{port}"), namespace)
        assert max_rel_err([namespace["vector"]], expected) <= PARITY
        assert max_rel_err(rows(namespace["documents"]), contexts["corpus"].encode_document(
            ["a passage of the corpus"])) <= PARITY
    finally:
        stop(process)


def test_sigterm_answers_every_accepted_request_then_exits_0(server, contexts):
    """Last: stops the server. What runs and what is queued when SIGTERM comes is answered;
    then the server exits 0 and accepts nothing more."""
    expected = contexts["corpus"].encode_query(QUERIES)
    with ThreadPoolExecutor(5) as pool:
        large = run_large(pool, server)
        pending = [pool.submit(post, server, "/v1/embeddings",
                               {"model": "corpus", "input": QUERIES}) for _ in range(4)]
        wait_until(lambda: metrics(server)["cde_serve_queue_requests"] == 1 + 4,
                   what="4 requests to queue behind the large one")
        server["process"].send_signal(signal.SIGTERM)
        assert large.result().status_code == 200
        for future in pending:
            answer = future.result()
            assert answer.status_code == 200
            got = [d["embedding"] for d in answer.json()["data"]]
            assert max_rel_err(got, expected) <= PARITY
    assert server["process"].wait(60) == 0, server["log"].read_text()
    assert "cde-jax serve: stopped" in server["log"].read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server["url"] + "/health")
