"""`cde-jax serve` as a real server process on 127.0.0.1, started once (with the session, from
the README's command line) on the tiny checkpoint with two contexts: the openai client and
TEI's /embed against `Context.encode`, every error answer, a full queue, a client that goes
away, batches formed while the device is busy, no compilation after start-up, the README's
examples, and SIGTERM under load (last: it stops the server)."""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import max_rel_err
from prometheus_client.parser import text_string_to_metric_families

import cde_jax
from cde_jax import cli
from cde_jax.prompts import DOCUMENT, QUERY

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ_LENGTH, MAX_QUEUE = 32, 64
MAX_WAIT_MS = 1000  # long: a batch that waited for nothing would show
QUERIES = ["what is a contextual document embedding?", "jax", "how do length buckets work "
           "when the texts of one batch have many different lengths in tokens?"]
LONG = " ".join(["tokens"] * 100)  # over MAX_SEQ_LENGTH
PARITY = 1e-6


def readme_blocks() -> list[tuple[str, str]]:
    """[(language, code)] of the fenced blocks of the README's "Serve" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Serve\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def readme_serve_argv(model_dir, context_file) -> list[str]:
    """The README's `cde-jax serve` command, for this checkpoint and context, on any port."""
    line = next(line for lang, code in readme_blocks() if lang == "bash"
                for line in code.replace("\\\n", " ").splitlines()
                if line.startswith("cde-jax serve"))
    swap = {"M": str(model_dir), "corpus=corpus.npz": f"corpus={context_file}", "8080": "0"}
    return [swap.get(arg, arg) for arg in shlex.split(line.split("#")[0])]


@pytest.fixture(scope="module")
def serve_process(tiny_checkpoint, ctx_npz, tmp_path_factory):
    """The server, listening; with its own compilation cache, so that every program it
    compiles counts in its metrics (a program loaded from a shared cache would not)."""
    tmp = tmp_path_factory.mktemp("serve_process")
    from cde_jax.convert import read_converted
    from cde_jax.minicorpus import DatasetEmbeddings

    other = DatasetEmbeddings(np.random.default_rng(1).standard_normal((512, 64)).astype(
        np.float32), read_converted(tiny_checkpoint[1]).fingerprint, DOCUMENT, 0)
    argv = readme_serve_argv(tiny_checkpoint[1], ctx_npz) + [
        "--context", f"other={other.save(tmp / 'other.npz')}", "--max-seq-length",
        str(MAX_SEQ_LENGTH), "--max-queue", str(MAX_QUEUE), "--max-wait-ms", str(MAX_WAIT_MS)]
    log = tmp / "server.log"
    with log.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "cde_jax.cli", *argv[1:]],
                                   stdout=subprocess.DEVNULL, stderr=err,
                                   env={**os.environ, "CDE_JAX_CACHE_DIR": str(tmp / "xla")})
    atexit.register(stop, process)  # whatever happens to the session
    deadline = time.monotonic() + 600
    while not (found := re.search(r"listening on (http://\S+)", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    url = found.group(1)
    wait_until(lambda: httpx.get(url + "/health").status_code == 200, what="/health")
    return {"process": process, "url": url, "log": log, "other": tmp / "other.npz",
            "http": httpx.Client(base_url=url, timeout=120)}


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(60)


def wait_until(check, *, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if result := check():
                return result
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(serve_process):
    yield serve_process
    serve_process["http"].close()
    stop(serve_process["process"])


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
    """Every sample of /metrics by name and labels, e.g. 'cde_serve_queue_texts' or
    'cde_serve_batch_texts_bucket{le=1.0}'."""
    text = server["http"].get("/metrics").text
    return {sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                           + "}" if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def queued(server) -> float:
    return metrics(server)["cde_serve_queue_texts"]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)


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
    "more than the queue": ({"model": "corpus", "input": ["a"] * (MAX_QUEUE + 1)},
                            openai_error(413, "input has 65 items, more than the server "
                                         "queues (--max-queue 64): split it", "input")),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=str)
def test_bad_requests_get_openai_errors(server, case):
    body, (status, expected) = BAD_REQUESTS[case]
    answer = post(server, "/v1/embeddings", body)
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
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (host.encode(), len(data), data))
    return sock


def run_large(pool: ThreadPoolExecutor, server):
    """A request of MAX_QUEUE texts of the largest bucket (10 batches, half a second on this
    machine when idle), running once this returns."""
    large = pool.submit(post, server, "/v1/embeddings", {
        "model": "other", "input": [f"{i} {LONG}" for i in range(MAX_QUEUE)]})
    wait_until(lambda: metrics(server)["cde_serve_running_texts"] == MAX_QUEUE,
               what="the large request to run")
    return large


def test_while_the_device_is_busy(server, contexts):
    """With the device busy on a large request: a client that hangs up while queued is
    dropped without running; requests that arrive meanwhile run together once it is free;
    a request that does not fit the queue gets 429 with Retry-After. Each step waits for
    the queue to show the one before, so nothing depends on timing but the large request
    (`run_large`) outlasting a few local round trips."""
    before = metrics(server)
    with ThreadPoolExecutor(10) as pool:
        large = run_large(pool, server)
        with raw_post(server, {"model": "corpus", "input": ["never answered"] * 5}):
            wait_until(lambda: queued(server) == 5, what="the request that hangs up to queue")
        wait_until(lambda: metrics(server)["cde_serve_cancelled_requests_total"]
                   == before["cde_serve_cancelled_requests_total"] + 1, what="the hang-up")
        small = [pool.submit(post, server, "/embed", {"inputs": QUERIES[i % 3]})
                 for i in range(8)]
        wait_until(lambda: queued(server) == 5 + 8, what="8 requests to queue")
        filling = pool.submit(post, server, "/v1/embeddings",
                              {"model": "corpus", "input": ["q"] * (MAX_QUEUE - 13)})
        wait_until(lambda: queued(server) == MAX_QUEUE, what="the queue to fill")
        with pytest.raises(openai.RateLimitError) as error:
            client(server).embeddings.create(model="corpus", input="one more")
        answers = [future.result() for future in (large, *small, filling)]
    assert int(error.value.response.headers["Retry-After"]) >= 1
    assert (error.value.type, error.value.code) == ("rate_limit_error", "queue_full")
    assert [answer.status_code for answer in answers] == [200] * 10
    expected = contexts["corpus"].encode_query(QUERIES)
    for i, answer in enumerate(answers[1:9]):
        assert max_rel_err(answer.json(), expected[i % 3:i % 3 + 1]) <= PARITY
    ran = {key: metrics(server)[key] - before[key]
           for key in ("cde_serve_batch_texts_count", "cde_serve_batch_texts_sum")}
    # two batches: the large request, then the 8 and the filling one together; the 5 texts
    # of the request that hung up never ran
    assert ran == {"cde_serve_batch_texts_count": 2,
                   "cde_serve_batch_texts_sum": MAX_QUEUE + 8 + MAX_QUEUE - 13}


def test_no_request_compiles(server):
    """Every shape was compiled at start-up: requests of both buckets at every batch size,
    both contexts, both routes, texts and token ids compile nothing (the server counts XLA
    compilations)."""
    compiled = metrics(server)["cde_serve_xla_compiles_total"]
    assert compiled >= 8  # the warm-up: the buckets 16 and 32 at 1, 2, 4 and 7 rows
    short, long = "w", " ".join(["w"] * 40)  # buckets 16 and 32 (cut)
    for n in (1, 2, 3, 5, 9):  # batches of 1, 2, 4, 7, then 7 and 2
        assert post(server, "/embed", {"inputs": [short] * n + [long] * n}).status_code == 200
    for model in ("corpus", "other"):
        assert post(server, "/v1/embeddings", {"model": model, "input": [short, long]}
                    ).status_code == 200
        assert post(server, "/embed", {"inputs": [[1] * 20], "model": model}).status_code == 200
    assert metrics(server)["cde_serve_xla_compiles_total"] == compiled


def test_a_lone_request_waits_for_no_batch(server):
    """A batch that is not full waits (up to --max-wait-ms) only for requests that are
    arriving; a request alone runs at once."""
    before = metrics(server)
    assert post(server, "/embed", {"inputs": "alone"}).status_code == 200
    after = metrics(server)
    assert after["cde_serve_queue_seconds_count"] - before["cde_serve_queue_seconds_count"] == 1
    waited = after["cde_serve_queue_seconds_sum"] - before["cde_serve_queue_seconds_sum"]
    assert waited < MAX_WAIT_MS / 1000 / 2


def test_batches_that_are_not_full_run_at_the_smallest_size_that_holds_them(server):
    """The CPU plan's 16-token batches hold 7 texts; fewer run in 1, 2 or 4 rows."""
    for texts, padding in ((1, 0), (3, 1), (5, 2), (9, 0)):  # 9: one of 7, one of 2
        before = metrics(server)["cde_serve_padding_rows_total"]
        assert post(server, "/embed", {"inputs": ["q"] * texts}).status_code == 200
        assert metrics(server)["cde_serve_padding_rows_total"] - before == padding, texts


@pytest.mark.parametrize("argv,message", [
    ([], "give at least one --context NAME=dataset.npz"),
    (["--context", "corpus"], "--context 'corpus': expected NAME=dataset.npz"),
    (["--context", "a=x.npz", "--context", "a=y.npz"], "--context 'a' is given twice"),
    (["--context", "a=x.npz", "--max-queue", "0"], "max_queue must be >= 1, got 0"),
], ids=["no context", "no file", "twice", "no queue"])
def test_bad_command_lines_stop_before_loading(argv, message, capsys):
    assert cli.main(["serve", "--model", "never-loaded", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cde-jax serve: error: {message}") and err.count("\n") == 1, err


def test_readme_examples(server, contexts):
    """The README's curl command and Python client example, against the running server."""
    port = server["url"].rsplit(":", 1)[1]
    blocks = [code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
              for _, code in readme_blocks()]
    curl = next(code for code in blocks if code.startswith("curl"))
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    expected = contexts["corpus"].encode_query(["what is a cde?"])
    assert max_rel_err([json.loads(done.stdout)["data"][0]["embedding"]], expected) <= PARITY
    namespace = {}
    exec(next(code for code in blocks if code.startswith("from openai")), namespace)
    assert max_rel_err([namespace["vector"]], expected) <= PARITY
    assert max_rel_err(rows(namespace["documents"]),
                       contexts["corpus"].encode_document(["a passage of the corpus"])) <= PARITY


def test_sigterm_answers_every_accepted_request_then_exits_0(server, contexts):
    """Last: stops the server. What runs and what is queued when SIGTERM comes is answered;
    then the server exits 0 and accepts nothing more."""
    expected = contexts["corpus"].encode_query(QUERIES)
    with ThreadPoolExecutor(5) as pool:
        large = run_large(pool, server)
        pending = [pool.submit(post, server, "/v1/embeddings",
                               {"model": "corpus", "input": QUERIES}) for _ in range(4)]
        wait_until(lambda: queued(server) == 4 * len(QUERIES), what="4 requests to queue")
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
