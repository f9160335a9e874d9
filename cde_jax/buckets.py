"""Length buckets: which texts go together in which batch shape.

Texts are sorted by length and each batch is padded to the smallest of a few fixed bucket
lengths that holds its longest text; each bucket has one fixed batch size, so a run compiles
at most (#buckets x #stages) programs whatever the corpus. With several processes, each plans
its own rows and the processes agree on the number of batches per bucket first, so that they
run the same programs in lockstep (`runner.StageRunner.run_buckets` runs the plan).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from . import distributed, validation
from .validation import UserError


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Bucket lengths and the batch size (global rows) for each. The defaults are CPU's;
    `default_plan` gives each platform its own."""

    lengths: tuple[int, ...] = (16, 32, 64, 96, 128, 192, 256, 384, 512)
    tokens_per_batch: int = 4096  # plenty for CPU matmuls
    max_batch: int = 128
    min_batch: int = 1

    def bucket_of(self, n_tokens: int) -> int:
        for length in self.lengths:
            if n_tokens <= length:
                return length
        raise UserError(f"{n_tokens} tokens exceed the largest bucket {self.lengths[-1]}")

    def batch_size(self, length: int, multiple: int, extra: int = 0) -> int:
        """About `tokens_per_batch` tokens per batch (counting `extra` tokens each row gets
        from the stage, the second stage's prefix), a multiple of the data shards."""
        rows = max(self.min_batch, min(self.max_batch, self.tokens_per_batch // (length + extra)))
        return max(multiple, rows // multiple * multiple)

    def with_batch_size(self, batch_size: int | None) -> BucketPlan:
        """A plan with one fixed batch size for every bucket (None: keep this plan)."""
        if batch_size is None:
            return self
        batch_size = validation.int_in_range(batch_size, "batch_size")
        return dataclasses.replace(self, tokens_per_batch=batch_size * self.lengths[-1],
                                   max_batch=batch_size, min_batch=batch_size)


# TPU buckets are multiples of 128, splash attention's tile (and the MXU's): a shorter
# bucket would be padded to 128 inside the kernel anyway.
TPU_LENGTHS = (128, 256, 384, 512)
# Accelerator batches: one batch's activations get a quarter of a device's memory (the rest
# holds the parameters, the batches in flight and XLA's temporaries), at ~128 KiB per token
# (bfloat16 ModernBERT-base whose attention materializes float32 logits over ~1k keys: the
# XLA fallback's worst case, the fused kernels need less). Clamped to 8k..64k tokens per
# device: past that, bigger batches do not run faster.
BYTES_PER_TOKEN = 128 * 1024
ACCELERATOR_TOKENS = (8192, 65536)
ASSUMED_MEMORY = 16 * 2 ** 30  # when the device does not report its memory
ACCELERATOR_MAX_BATCH = 1024


def device_memory(device) -> int | None:
    """Bytes of memory the device reports (`memory_stats()["bytes_limit"]`), or None."""
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError):
        return None
    return (stats or {}).get("bytes_limit")


def default_plan(platform: str, memory_bytes: int | None = None, devices: int = 1
                 ) -> BucketPlan:
    """The bucket plan for `devices` data-parallel devices of `platform` with
    `memory_bytes` each: CPU keeps `BucketPlan()`; GPUs and TPUs get tokens per batch from
    their memory (see `BYTES_PER_TOKEN`), rounded down to a multiple of 4096, times the
    devices, up to 1024 rows; TPUs get `TPU_LENGTHS`."""
    if platform == "cpu":
        return BucketPlan()
    low, high = ACCELERATOR_TOKENS
    per_device = (memory_bytes or ASSUMED_MEMORY) // 4 // BYTES_PER_TOKEN
    per_device = min(high, max(low, per_device // 4096 * 4096))
    lengths = TPU_LENGTHS if platform == "tpu" else BucketPlan.lengths
    return BucketPlan(lengths=lengths, tokens_per_batch=per_device * devices,
                      max_batch=ACCELERATOR_MAX_BATCH * devices)


def _batches(lengths: Sequence[int], plan: BucketPlan, size_of: Callable[[int], int]):
    """{bucket length: [row index arrays, padded with -1]}. Texts go longest first; a batch
    takes as many rows as its longest text's bucket allows and fills them with the next
    longest texts, so no batch waits for its own bucket to fill: only the very last batch
    has empty rows."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    out: dict[int, list[np.ndarray]] = {}
    start = 0
    while start < len(order):
        length = plan.bucket_of(lengths[order[start]])
        rows = np.full(size_of(length), -1, np.int64)
        chunk = order[start:start + len(rows)]
        rows[:len(chunk)] = chunk
        out.setdefault(length, []).append(rows)
        start += len(rows)
    return out


def _agree_on_batch_counts(batches: dict, plan: BucketPlan, local_size: Callable[[int], int]):
    """Pads every process's batch lists to the same count per bucket (all-gather of counts)."""
    counts = distributed.max_all(np.array([len(batches.get(length, []))
                                           for length in plan.lengths], np.int64))
    return {length: batches.get(length, []) + [np.full(local_size(length), -1, np.int64)] * (
        int(n) - len(batches.get(length, []))) for length, n in zip(plan.lengths, counts) if n}


def plan_batches(lengths: Sequence[int], plan: BucketPlan, local_size: Callable[[int], int]
                 ) -> list[tuple[int, np.ndarray]]:
    """[(bucket length, row indices padded with -1)] for this process's texts of these token
    lengths, shortest bucket first, in lockstep with every other process."""
    batches = _agree_on_batch_counts(_batches(lengths, plan, local_size), plan, local_size)
    return [(length, rows) for length in sorted(batches) for rows in batches[length]]
