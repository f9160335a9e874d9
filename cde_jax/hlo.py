"""Facts read from a compiled program's optimized HLO text (`jax.stages.Compiled.as_text()`):
the custom calls it makes, its collectives, its while loops, and a tally of the bytes its
kernels move and of the FLOPs of its matmuls and fused-attention calls.

The tally exists because XLA:GPU's `cost_analysis()` is empty for a compile-only device; on
TPUs, where XLA's cost analysis is there, `aot` reports that. The tally counts what XLA's own
cost analysis counts per kernel: each instruction that runs as a kernel (a fusion, a custom
call, a copy, a collective, an unfused elementwise op) reads its operands and writes its
result, so its bytes are the sizes of both. Instructions that move nothing (parameters,
constants, tuples, get-tuple-element, bitcasts) are skipped; the scratch buffers that custom
calls return beside their results (cuBLAS and cuDNN workspaces, s8/u8) are not traffic.
Calls, while loops and conditionals are entered (a while body counted its known trip count
times). FLOPs: 2 x output x contracted size per dot and cuBLAS call, 4 x b x h x t x s x e
per cuDNN attention call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter

ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
              "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
              "s4": 0.5, "u4": 0.5}
ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[([0-9,]*)\]")
COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
CALLED = re.compile(r"\b(?:to_apply|body|condition|calls|branch_computations|"
                    r"true_computation|false_computation)=\{?([^}\s,]+(?:,\s*%[\w.\-]+)*)\}?")
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
              "opt-barrier", "partition-id", "replica-id", "copy-done", "async-done",
              "all-gather-done", "all-reduce-done", "collective-permute-done", "iota"}
ENTERED = {"call", "while", "conditional", "async-start"}
GEMMS = ("__cublas$gemm", "__cublas$lt$matmul")
CUDNN_ATTENTION = "__cudnn$fmha"
MOSAIC = "tpu_custom_call"


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each array it returns
    opcode: str
    operands: tuple[str, ...]
    attributes: str  # everything after the operand list
    computation: str


def _type_and_rest(text: str) -> tuple[str, str]:
    """`TYPE opcode(...)...` -> (TYPE, the rest); a tuple type is parenthesized."""
    if not text.startswith("("):
        head, _, rest = text.partition(" ")
        return head, rest
    depth = 0
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if depth == 0:
            return text[:i + 1], text[i + 1:].lstrip()
    return text, ""


def _split_call(rest: str) -> tuple[str, str, str]:
    """`opcode(operands), attributes` -> (opcode, operands, attributes)."""
    opcode, _, tail = rest.partition("(")
    depth = 1
    for i, char in enumerate(tail):
        depth += (char in "({[") - (char in ")}]")
        if depth == 0:
            return opcode.strip(), tail[:i], tail[i + 1:]
    return opcode.strip(), tail, ""


def arrays(type_text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The (dtype, dims) of every array in an HLO type (layouts and memory spaces ignored)."""
    return tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                 for dtype, dims in ARRAY.findall(re.sub(r"\{[^{}]*\}", "", type_text)))


def nbytes(shapes) -> float:
    return sum(ITEM_BYTES.get(dtype, 1) * math.prod(dims) for dtype, dims in shapes)


class Module:
    """An optimized HLO module: its computations and their instructions, by name."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = ""
        current = None
        for line in text.splitlines():
            head = COMPUTATION.match(line)
            if head and "=" not in line.split("(")[0]:
                current = head.group(2)
                self.computations[current] = []
                self.entry = current if head.group(1) else self.entry
                continue
            match = INSTRUCTION.match(line)
            if current is None or not match:
                continue
            type_text, rest = _type_and_rest(match.group(2))
            opcode, operands, attributes = _split_call(rest)
            self.computations[current].append(Instruction(
                match.group(1), arrays(type_text), opcode,
                tuple(re.findall(r"%([\w.\-]+)", operands)), attributes, current))
        self.by_name = {(i.computation, i.name): i for body in self.computations.values()
                        for i in body}

    def instructions(self):
        for body in self.computations.values():
            yield from body

    def custom_calls(self) -> Counter:
        """{custom call target: count} over the whole module."""
        return Counter(_target(i) for i in self.instructions() if i.opcode == "custom-call")

    def pallas_kernels(self) -> Counter:
        """{kernel name: count} of the Mosaic calls, by the name their `pallas_call` was
        given (the metadata's op_name reads ".../<name>/pallas_call"; "" when unnamed)."""
        names = Counter()
        for i in self.instructions():
            if i.opcode == "custom-call" and _target(i) == MOSAIC:
                op_name = re.search(r'op_name="([^"]*)"', i.attributes)
                parts = op_name.group(1).split("/") if op_name else []
                names[parts[-2] if len(parts) > 1 and parts[-1] == "pallas_call" else ""] += 1
        return names

    def collectives(self) -> Counter:
        """{collective op: count}; asynchronous pairs counted once (their -start)."""
        return Counter(i.opcode.removesuffix("-start") for i in self.instructions()
                       if i.opcode.removesuffix("-start") in COLLECTIVES)

    def while_loops(self) -> int:
        return sum(i.opcode == "while" for i in self.instructions())

    def executed(self, computation: str | None = None, times: int = 1):
        """(instruction, times run) of every instruction that runs as a kernel, entering
        calls, while bodies (`known_trip_count` times) and conditionals."""
        for instr in self.computations[computation or self.entry]:
            if instr.opcode in ENTERED:
                trips = _trip_count(instr) if instr.opcode == "while" else 1
                for called in _called(instr):
                    yield from self.executed(called, times * trips)
            elif instr.opcode not in NO_TRAFFIC:
                yield instr, times

    def bytes_accessed(self, custom_call: str | None = None) -> float:
        """Operand plus result bytes of every kernel run (see the module docstring), or only
        of the custom calls to `custom_call` (e.g. `MOSAIC`)."""
        total = 0.0
        for instr, times in self.executed():
            if custom_call is not None and (instr.opcode != "custom-call"
                                            or _target(instr) != custom_call):
                continue
            out = instr.shapes
            if instr.opcode == "custom-call" and len(out) > 1:
                out = tuple(s for s in out if s[0] not in ("s8", "u8"))
            ins = sum(nbytes(self._shapes(instr.computation, o)) for o in instr.operands)
            total += times * (nbytes(out) + ins)
        return total

    def matmul_flops(self) -> float:
        """FLOPs of every dot (fused or not), cuBLAS call and cuDNN attention call."""
        total = 0.0
        for instr in self.instructions():
            if instr.opcode == "dot":
                contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attributes)
                total += self._dot_flops(instr, _ints(contracting.group(1) if contracting else ""))
            elif instr.opcode == "custom-call" and _target(instr) in GEMMS:
                config = _backend_config(instr).get("gemm_backend_config", {})
                dims = config.get("dot_dimension_numbers", {})
                total += self._dot_flops(instr, [int(d) for d in dims.get(
                    "lhs_contracting_dimensions", [])])
            elif instr.opcode == "custom-call" and _target(instr).startswith(CUDNN_ATTENTION):
                (_, (b, t, h, e)), (_, (_, s, _, _)) = (
                    self._shapes(instr.computation, o)[0] for o in instr.operands[:2])
                total += 4.0 * b * h * t * s * e
        return total

    def _dot_flops(self, instr: Instruction, contracting: list[int]) -> float:
        lhs_dims = self._shapes(instr.computation, instr.operands[0])[0][1]
        return 2.0 * math.prod(instr.shapes[0][1]) * math.prod(lhs_dims[d] for d in contracting)

    def _shapes(self, computation: str, name: str):
        instr = self.by_name.get((computation, name))
        return instr.shapes if instr is not None else ()


def _target(instr: Instruction) -> str:
    match = re.search(r'custom_call_target="([^"]+)"', instr.attributes)
    return match.group(1) if match else ""


def _backend_config(instr: Instruction) -> dict:
    match = re.search(r"backend_config=(\{.*?\})(?:, [a-z_]+=|$)", instr.attributes)
    try:
        return json.loads(match.group(1)) if match else {}
    except json.JSONDecodeError:
        return {}


def _trip_count(instr: Instruction) -> int:
    match = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attributes)
    return int(match.group(1)) if match else 1


def _called(instr: Instruction) -> list[str]:
    return [name.strip().lstrip("%") for match in CALLED.findall(instr.attributes)
            for name in match.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]
