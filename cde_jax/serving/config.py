"""The server's settings: one frozen config, from which `cde-jax serve` makes its flags."""

from __future__ import annotations

import dataclasses
import re

from ..config import setting
from ..tokenization import MAX_LENGTH
from ..validation import UserError, int_in_range

CONTEXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    context: tuple[str, ...] = setting(
        (), help="NAME=dataset.npz: a context the server holds (a dataset-embeddings file of "
                 "this model), selected by a request's `model`; repeat for several (the first "
                 "is /embed's default)")
    host: str = setting("127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    port: int = setting(8080, help="port to listen on (0: any free port, printed at start)")
    max_seq_length: int = setting(
        MAX_LENGTH, help="tokens per text, [CLS]/[SEP] and the prompt included: longer inputs "
                         "are cut (a request with truncate=false gets 413); only the buckets up "
                         "to it are compiled")
    max_queue: int = setting(
        2048, help="texts waiting for the model at most: a request that does not fit gets 429 "
                   "with Retry-After, one with more inputs than this 413")
    max_wait_ms: float = setting(
        5.0, help="how long a batch that is not full waits for requests already arriving "
                  "(dynamic batching; a full batch, or a lone request, runs at once)")

    def __post_init__(self):
        parse_contexts(self.context)
        int_in_range(self.port, "port", 0, 65535)
        int_in_range(self.max_seq_length, "max_seq_length", 2, MAX_LENGTH)
        int_in_range(self.max_queue, "max_queue")
        if not 0 <= self.max_wait_ms <= 1000:
            raise UserError(f"max_wait_ms must be in 0..1000, got {self.max_wait_ms}")

    @property
    def contexts(self) -> dict[str, str]:
        """{name: dataset-embeddings file}, in the order given."""
        return parse_contexts(self.context)


def parse_contexts(items: tuple[str, ...]) -> dict[str, str]:
    if not items:
        raise UserError("give at least one --context NAME=dataset.npz")
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
