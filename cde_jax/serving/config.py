"""The server's settings: one frozen config, from which `cde-jax serve` makes its flags."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ..config import setting
from ..tokenization import MAX_LENGTH
from ..validation import UserError, int_in_range

CONTEXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
KEY_VARIABLE = "CDE_JAX_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    context: tuple[str, ...] = setting(
        (), help="NAME=dataset.npz: a context the server holds (a dataset-embeddings file of "
                 "this model), selected by a request's `model`; repeat for several (the first "
                 "is /embed's default)")
    context_dir: str | None = setting(
        None, help="a directory of contexts (NAME.npz, dataset-embeddings files): loaded at "
                   "start, and where POST /v1/contexts saves and DELETE removes them")
    host: str = setting("127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    port: int = setting(8080, help="port to listen on (0: any free port, printed at start)")
    max_seq_length: int = setting(
        MAX_LENGTH, help="tokens per text, [CLS]/[SEP] and the prompt included: longer inputs "
                         "are cut (a request with truncate=false gets 413); only the buckets up "
                         "to it are compiled")
    max_queue: int = setting(
        2048, help="texts waiting for the model at most: a request that does not fit gets 429 "
                   "with Retry-After")
    max_batch_tokens: int | None = setting(
        None, help="positions one batch runs at most, each text's padded length plus the "
                   "context's prefix (520 positions for cde-small-v2) (default: the device's "
                   "bucket plan); a request over it is split across batches")
    max_client_batch_size: int = setting(
        2048, help="inputs per request at most (more: 413)")
    payload_limit: int = setting(
        4_000_000, help="bytes of a request body at most (more: 413); a context's base64 "
                        "dataset embeddings take 4/3 x 4 x rows x width (cde-small-v2: 2.1 MB)")
    api_key: tuple[str, ...] = dataclasses.field(default=(), repr=False, metadata={
        "help": f"a key clients must send (Authorization: Bearer KEY) on every route but "
                f"/health; repeat for several; or set {KEY_VARIABLE}, or --api-key-file "
                f"(a flag's value shows in `ps`: prefer those)", "choices": None})
    api_key_file: str | None = setting(
        None, help="a file of keys, one per line (blank lines and # comments skipped)")
    public_metrics: bool = setting(
        False, help="serve /metrics without a key (Prometheus scrapers without credentials)")
    ssl_certfile: str | None = setting(None, help="TLS certificate (PEM), passed to uvicorn")
    ssl_keyfile: str | None = setting(None, help="TLS private key (PEM), passed to uvicorn")

    def __post_init__(self):
        parse_contexts(self.context)
        if not self.context and self.context_dir is None:
            raise UserError("give at least one --context NAME=dataset.npz, or --context-dir")
        int_in_range(self.port, "port", 0, 65535)
        int_in_range(self.max_seq_length, "max_seq_length", 2, MAX_LENGTH)
        int_in_range(self.max_queue, "max_queue")
        int_in_range(self.max_client_batch_size, "max_client_batch_size")
        int_in_range(self.payload_limit, "payload_limit", 64)
        if self.max_batch_tokens is not None:
            int_in_range(self.max_batch_tokens, "max_batch_tokens")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise UserError("give both --ssl-certfile and --ssl-keyfile, or neither")

    @property
    def contexts(self) -> dict[str, str]:
        """{name: dataset-embeddings file}, in the order given."""
        return parse_contexts(self.context)

    def keys(self) -> list[str]:
        """Every key clients may send: --api-key, $CDE_JAX_API_KEY, --api-key-file's lines;
        none: the server is open (as before keys existed)."""
        keys = list(self.api_key)
        if os.environ.get(KEY_VARIABLE):
            keys.append(os.environ[KEY_VARIABLE])
        if self.api_key_file is not None:
            try:
                lines = Path(self.api_key_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"--api-key-file {self.api_key_file}: cannot read it "
                                f"({type(e).__name__})") from None
            found = [line.strip() for line in lines
                     if line.strip() and not line.lstrip().startswith("#")]
            if not found:
                raise UserError(f"--api-key-file {self.api_key_file}: no key in it")
            keys += found
        for i, key in enumerate(keys):
            if any(c.isspace() for c in key) or not key.isprintable():
                raise UserError(f"API key #{i + 1} holds a space or an unprintable "
                                f"character (its value is not shown)")
        return keys


def parse_contexts(items: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path or not CONTEXT_NAME.fullmatch(name):
            raise UserError(f"--context {item!r}: expected NAME=dataset.npz, NAME of letters, "
                            f"digits and ._:/- (a request's `model`)")
        if name in out:
            raise UserError(f"--context {name!r} is given twice")
        out[name] = path
    return out
