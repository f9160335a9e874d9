#!/usr/bin/env python
"""A soak of `cde-jax serve` under faults, on 127.0.0.1 only; bounded, stops by itself.

    python scripts/serve_soak.py [--requests 20000] [--clients 32] [--json OUT]

One server (a random-weight tiny checkpoint unless --model, an API key, --context-dir)
takes `--requests` requests from `--clients` concurrent clients, mixed: embeddings of 1 to 8
texts of mixed lengths (both routes, float and base64), clients that hang up mid-request,
clients that send their body slowly, malformed JSON, bodies over --payload-limit, too many
inputs, missing or wrong keys; meanwhile a context is added (base64 dataset embeddings),
queried and deleted, and another is made from texts and deleted. Then a burst of requests
and SIGTERM. It checks, and exits 1 unless all hold:
- every accepted request was answered, and every answer equals `Context.encode` of its
  texts (max relative error <= 1e-5);
- every other answer has the status its fault calls for;
- the server's resident memory grew <= 5% from the first quarter of the requests to the
  last (medians of samples taken every 0.2 s);
- /metrics counts, per route and status, what the clients counted (a hung-up request is
  499, or 200 when it was answered before the server saw the hang-up);
- after SIGTERM every request in flight is answered, and the server exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import random
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_benchmark import checkpoint_and_context, metric_samples, start_server  # noqa: E402

MAX_SEQ_LENGTH, PAYLOAD_LIMIT, MAX_INPUTS = 32, 262144, 16
PARITY = 1e-5
WORDS = ("context", "document", "embedding", "jax", "query", "corpus", "batch", "token")
ADDED, MADE = "added", "made"  # the contexts made under load
FAULTS = (  # (kind, weight)
    ("embed", 70), ("hang_up", 6), ("slow_body", 5), ("malformed", 6), ("oversize", 4),
    ("too_many", 3), ("no_key", 3), ("wrong_key", 3))


def text_pool() -> list[str]:
    """48 texts of 1 to 90 words: both buckets (16, 32 tokens), some cut."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 90 if i % 8 == 0 else 40)))
            for i in range(48)]


class Expected:
    """Context.encode of the pool, per context and role, computed here before the load."""

    def __init__(self, model_dir: Path, context_file: Path, added_md: np.ndarray,
                 made_texts: list[str]):
        import cde_jax
        from cde_jax.tokenization import quiet_truncation

        model = cde_jax.load(model_dir)
        model.max_seq_length = MAX_SEQ_LENGTH
        self.pool = text_pool()
        with quiet_truncation():
            contexts = {"bench": model.context(context_file), ADDED: model.context(added_md),
                        MADE: model.context(made_texts)}
            self.rows = {(name, role): ctx.encode(self.pool, prompt_name=role)
                         for name, ctx in contexts.items() for role in ("query", "document")}

    def error(self, context: str, role: str, picks: list[int], got) -> float:
        want = self.rows[context, role][picks]
        got = np.asarray(got, np.float64)
        if got.shape != want.shape:
            return float("inf")
        return float(np.abs(got - want).max() / np.abs(want).max())


class Soak:
    def __init__(self, url: str, key: str, expected: Expected, args):
        self.url, self.key, self.expected, self.args = url, key, expected, args
        self.host, self.port = url.removeprefix("http://").split(":")
        self.auth = {"Authorization": f"Bearer {key}"}
        self.counts = collections.Counter()  # (route, status) the clients saw
        self.hung_up = collections.Counter()  # route: requests hung up on
        self.kinds = collections.Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.worst = 0.0
        self.sent = 0
        self.live: set[str] = {"bench"}  # contexts a request may name now
        self.deleting: set[str] = set()

    # --- one request of each kind ------------------------------------------------------
    def body(self, rng: random.Random, kind: str) -> tuple[str, dict, tuple]:
        """(route, body, (context, role, picks)) of a valid embeddings request (to a context
        made under load only if it is one, not a fault)."""
        context = rng.choice(sorted(self.live)) if kind in ("embed", "slow_body") else "bench"
        role = rng.choice(("query", "document"))
        picks = [rng.randrange(len(self.expected.pool)) for _ in range(rng.randint(1, 8))]
        texts = [self.expected.pool[i] for i in picks]
        if rng.random() < 0.5:
            return "/embed", {"inputs": texts, "model": context, "prompt_name": role}, (
                context, role, picks)
        return "/v1/embeddings", {"input": texts, "model": context, "prompt_name": role,
                                  "encoding_format": rng.choice(("float", "base64"))}, (
            context, role, picks)

    def check(self, route: str, status: int, answer, want: tuple) -> None:
        context, role, picks = want
        if status == 404 and context in self.deleting | ({context} - self.live):
            return  # named a context being deleted
        if status != 200:
            self.failures.append(f"{route} {context}: status {status}: {str(answer)[:200]}")
            return
        if route == "/v1/embeddings":
            rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                    if isinstance(d["embedding"], str) else d["embedding"]
                    for d in answer["data"]]
        else:
            rows = answer
        err = self.expected.error(context, role, picks, rows)
        self.worst = max(self.worst, err)
        if err > PARITY:
            self.failures.append(f"{route} {context}: answer off by {err:.2e}")

    async def raw(self, route: str, payload: bytes, *, slow: bool, hang_up: float | None,
                  auth: bool = True) -> tuple[int, bytes] | None:
        """A request on a socket of our own: its body sent in slow pieces, or hung up on
        `hang_up` seconds after it was sent."""
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        head = (f"POST {route} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n"
                + (f"Authorization: Bearer {self.key}\r\n" if auth else "") + "\r\n")
        writer.write(head.encode())
        try:
            if slow:
                step = max(1, len(payload) // 4)
                for i in range(0, len(payload), step):
                    writer.write(payload[i:i + step])
                    await writer.drain()
                    await asyncio.sleep(0.03)
            else:
                writer.write(payload)
                await writer.drain()
            if hang_up is not None:
                await asyncio.sleep(hang_up)
                return None
            data = await asyncio.wait_for(reader.read(), 300)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    async def one(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        kind = rng.choices([k for k, _ in FAULTS], [w for _, w in FAULTS])[0]
        self.kinds[kind] += 1
        route, body, want = self.body(rng, kind)
        start = time.perf_counter()
        if kind in ("embed", "no_key", "wrong_key", "too_many", "malformed", "oversize"):
            headers = dict(self.auth)
            if kind == "no_key":
                headers = {}
            elif kind == "wrong_key":
                headers = {"Authorization": "Bearer not-" + self.key}
            field = "inputs" if route == "/embed" else "input"
            if kind == "too_many":
                body[field] = [self.expected.pool[0]] * (MAX_INPUTS + 1)
            if kind == "oversize":
                body[field] = ["w " * (PAYLOAD_LIMIT // 2 + 1)]
            content = json.dumps(body).encode()
            if kind == "malformed":
                content = content[:rng.randrange(1, len(content) - 1)]
            answer = await http.post(route, content=content, headers={
                **headers, "Content-Type": "application/json"})
            status, data = answer.status_code, answer.content
        else:
            got = await self.raw(route, json.dumps(body).encode(), slow=kind == "slow_body",
                                 hang_up=rng.uniform(0.005, 0.03) if kind == "hang_up"
                                 else None)
            if got is None:
                self.hung_up[route] += 1
                return
            status, data = got
        self.latencies.append(time.perf_counter() - start)
        self.counts[route, status] += 1
        wanted = {"no_key": 401, "wrong_key": 401, "too_many": 413, "malformed": 400,
                  "oversize": 413}.get(kind)
        if wanted is not None:
            if status != wanted:
                self.failures.append(f"{kind} on {route}: status {status}, not {wanted}")
        else:
            self.check(route, status, json.loads(data) if status == 200 else data, want)

    # --- the run ---------------------------------------------------------------------
    async def client(self, c: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(c)
        while self.sent < self.args.requests:
            self.sent += 1
            try:
                await self.one(http, rng)
            except Exception as e:  # a request lost: no answer
                self.failures.append(f"client {c}: {type(e).__name__}: {e}")

    async def contexts(self, http: httpx.AsyncClient, added_md: np.ndarray,
                       made_texts: list[str]) -> dict:
        """Adds, serves and deletes the two contexts while the clients run."""
        n, out = self.args.requests, {}

        async def at(fraction: float):
            while self.sent < fraction * n:
                await asyncio.sleep(0.02)

        async def post(body: dict, name: str):
            start = time.perf_counter()
            answer = await http.post("/v1/contexts", json=body, headers=self.auth)
            out[f"make {name} s"] = round(time.perf_counter() - start, 2)
            if answer.status_code != 201:
                self.failures.append(f"POST /v1/contexts {name}: {answer.status_code} "
                                     f"{answer.text[:200]}")
            self.live.add(name)

        async def delete(name: str):
            self.deleting.add(name)
            self.live.discard(name)
            answer = await http.delete(f"/v1/contexts/{name}", headers=self.auth)
            if answer.status_code != 200:
                self.failures.append(f"DELETE {name}: {answer.status_code}")

        await at(0.2)
        await post({"name": ADDED, "dataset_embeddings": base64.b64encode(
            added_md.astype("<f4").tobytes()).decode()}, ADDED)
        await at(0.35)
        await post({"name": MADE, "texts": made_texts}, MADE)
        await at(0.6)
        await delete(ADDED)
        await at(0.75)
        await delete(MADE)
        return out

    async def memory(self, pid: int, samples: list) -> None:
        while self.sent < self.args.requests:
            samples.append((self.sent, resident_bytes(pid)))
            await asyncio.sleep(0.2)

    async def run(self, pid: int, added_md, made_texts) -> dict:
        limits = httpx.Limits(max_connections=self.args.clients)
        samples: list[tuple[int, int]] = []
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as http:
            before = metric_samples(self.url, self.auth)
            start = time.perf_counter()
            tasks = [self.client(c, http) for c in range(self.args.clients)]
            made, *_ = await asyncio.gather(self.contexts(http, added_md, made_texts),
                                            self.memory(pid, samples), *tasks)
            wall = time.perf_counter() - start
            await asyncio.sleep(0.5)  # the last hang-ups reach the server's counters
            after = metric_samples(self.url, self.auth)
        quarter = self.args.requests / 4
        first = [rss for done, rss in samples if done < quarter]
        last = [rss for done, rss in samples if done >= 3 * quarter]
        growth = statistics.median(last) / statistics.median(first) - 1
        if growth > 0.05:
            self.failures.append(f"resident memory grew {growth:.1%} (> 5%)")
        mismatches = self.metrics_mismatches(before, after)
        self.failures[:0] = mismatches
        return {"requests": self.sent, "wall_s": round(wall, 1),
                "requests_per_s": round(self.sent / wall, 1),
                "p50_ms": round(1e3 * float(np.percentile(self.latencies, 50)), 1),
                "p99_ms": round(1e3 * float(np.percentile(self.latencies, 99)), 1),
                "kinds": dict(self.kinds), "hung_up": sum(self.hung_up.values()),
                "statuses": {f"{route} {status}": n for (route, status), n
                             in sorted(self.counts.items())},
                "worst_rel_err": self.worst,
                "rss_first_quarter_mib": round(statistics.median(first) / 2 ** 20, 1),
                "rss_last_quarter_mib": round(statistics.median(last) / 2 ** 20, 1),
                "rss_growth": round(growth, 4), "metrics_consistent": not mismatches,
                **made}

    def metrics_mismatches(self, before: dict, after: dict) -> list[str]:
        server = collections.Counter()
        routes = self.hung_up.keys() | {route for route, _ in self.counts}
        for key, value in after.items():
            labels = dict(key[1])
            if key[0] == "cde_serve_requests_total" and labels["route"] in routes:
                server[labels["route"], int(labels["status"])] += value - before.get(key, 0)
        out = []
        for route in {route for route, _ in server} | {route for route, _ in self.counts}:
            for status in {s for r, s in server if r == route} | {
                    s for r, s in self.counts if r == route}:
                if status in (200, 499):
                    continue
                if server[route, status] != self.counts[route, status]:
                    out.append(f"/metrics: {route} {status}: server {server[route, status]:g}"
                               f", clients {self.counts[route, status]}")
            hung, ok = self.hung_up[route], self.counts[route, 200]
            # a hang-up is a 499, or a 200 when the answer was sent before it was seen
            if not (server[route, 499] + server[route, 200] == ok + hung
                    and server[route, 200] >= ok):
                out.append(f"/metrics: {route}: server 200 {server[route, 200]:g} + 499 "
                           f"{server[route, 499]:g}, clients 200 {ok} + hung up {hung}")
        return out


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


async def drain(url: str, key: str, process, expected: Expected, clients: int) -> dict:
    """`clients` requests in flight, then SIGTERM: each answered right, the server exits 0."""
    auth = {"Authorization": f"Bearer {key}"}
    picks = list(range(8))
    body = {"model": "bench", "input": [expected.pool[i] for i in picks],
            "encoding_format": "float"}
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=clients + 1)) as http:
        pending = [asyncio.ensure_future(http.post("/v1/embeddings", json=body, headers=auth))
                   for _ in range(clients)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            samples = metric_samples(url, auth)
            if samples.get(("cde_serve_requests_in_progress",
                            (("route", "/v1/embeddings"),)), 0) >= clients:
                break
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*pending, return_exceptions=True)
    code = await asyncio.to_thread(process.wait, 120)
    good = sum(not isinstance(a, Exception) and a.status_code == 200 and expected.error(
        "bench", "query", picks, [d["embedding"] for d in a.json()["data"]]) <= PARITY
        for a in answers)
    return {"drained": good, "in_flight": clients, "exit_code": code}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a converted checkpoint (default: synthetic)")
    ap.add_argument("--preset", choices=("tiny", "base"), default="tiny")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("CDE_JAX_CACHE_DIR", str(work / "xla"))
        model, context = checkpoint_and_context(args, work)
        width = int(np.load(context)["embeddings"].shape[1])
        added_md = np.random.default_rng(7).standard_normal((512, width)).astype(np.float32)
        made_texts = [f"{' '.join(WORDS[i % 8:])} document {i}" for i in range(600)]
        expected = Expected(model, context, added_md, made_texts)
        key = secrets.token_urlsafe(24)
        process, url = start_server(model, context, work / "server.log", [
            "--max-seq-length", str(MAX_SEQ_LENGTH), "--max-queue", "4096",
            "--payload-limit", str(PAYLOAD_LIMIT), "--max-client-batch-size",
            str(MAX_INPUTS), "--context-dir", str(work / "contexts")],
            env={**os.environ, "CDE_JAX_API_KEY": key})
        try:
            soak = Soak(url, key, expected, args)
            figures = asyncio.run(soak.run(process.pid, added_md, made_texts))
            figures.update(asyncio.run(drain(url, key, process, expected, args.clients)))
        finally:
            if process.poll() is None:
                process.kill()
        log = (work / "server.log").read_text()
        if key in log:
            soak.failures.append("the API key is in the server's log")
        if figures["drained"] != figures["in_flight"] or figures["exit_code"] != 0:
            soak.failures.append(f"SIGTERM: {figures['drained']} of {figures['in_flight']} "
                                 f"answered right, exit code {figures['exit_code']}")
        figures["failures"] = soak.failures[:20]
        figures["load_average"] = os.getloadavg()
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 1 if soak.failures else 0


if __name__ == "__main__":
    sys.exit(main())
