"""What a compiled TPU program contains, read from its HLO text (`compiled.as_text()`): Mosaic kernels, other
custom calls, and collectives with the bytes they produce.

Counts are of instructions in the program text, not of executions: a collective inside a scanned layer body (a
while loop) counts once however many layers run it, so these are a map of what communicates, not a traffic
total. The TPU compiler writes a reduce-scatter as a fused computation named `all-reduce-scatter...` (an
all-reduce, then each device slices its part); such a computation counts as one reduce-scatter of its result.
"""
from __future__ import annotations

import re
from collections import Counter

MOSAIC_TARGET = "tpu_custom_call"  # a Pallas kernel compiled by Mosaic
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# bytes per element of HLO primitive types (sub-byte types rounded up per element count below)
_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32,
         "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]")
# `%name = SHAPE opcode(` where SHAPE may be a tuple "(f32[2]{0}, bf16[4,8]{1,0})"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) +
                          r")(-start|-done)?\(")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
# a computation header: `%name (param: f32[2], ...) -> RESULT_SHAPE {` (or `ENTRY %name ...`)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*(.+?)\s*\{\s*$")
_FUSED_REDUCE_SCATTER = "all-reduce-scatter"


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: an array `bf16[4,128]{1,0}` or a tuple of them (summed). f8 types: 1 byte."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = _BITS.get(dtype, 8 if dtype.startswith("f8") else 0)
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += (count * bits + 7) // 8
    return total


def collectives(hlo_text: str) -> dict:
    """{kind: {"count": n, "bytes": result bytes summed}} of every collective instruction, one entry per kind
    in COLLECTIVES (zeros included). An async pair (`-start` / `-done`) counts once, by its `-done`, whose
    result is the collective's output; the `-start` result tuple also holds the operand."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    in_fused_reduce_scatter = False
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            in_fused_reduce_scatter = header.group(1).startswith(_FUSED_REDUCE_SCATTER)
            if in_fused_reduce_scatter:
                out["reduce-scatter"]["count"] += 1
                out["reduce-scatter"]["bytes"] += shape_bytes(header.group(2))
            continue
        hit = _INSTRUCTION.match(line)
        if hit is None or hit.group(3) == "-start" or in_fused_reduce_scatter:
            continue
        shape, kind = hit.group(1), hit.group(2)
        out[kind]["count"] += 1
        out[kind]["bytes"] += shape_bytes(shape)
    return out


def custom_calls(hlo_text: str) -> dict:
    """{custom-call target: count} of the program (Mosaic kernels are MOSAIC_TARGET)."""
    return dict(Counter(_CUSTOM_CALL.findall(hlo_text)))


def mosaic_kernels(hlo_text: str) -> int:
    return custom_calls(hlo_text).get(MOSAIC_TARGET, 0)
