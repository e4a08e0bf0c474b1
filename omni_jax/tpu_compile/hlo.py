"""What a compiled TPU program contains, read from its HLO text (`compiled.as_text()`): Mosaic kernels, other
custom calls, and collectives with the bytes they produce.

`collectives` counts instructions in the program text, not executions: a collective inside a scanned layer body
(a while loop) counts once however many layers run it, so these are a map of what communicates.
`collective_traffic` counts executions (loop trip counts from the loop conditions) and the bytes each chip
receives. Both count one collective once where the TPU compiler splits it into pieces that share a channel_id
(an async start fused apart from its continuations). The TPU compiler writes a reduce-scatter as a fused computation named `all-reduce-scatter...` (an
all-reduce, then each device slices its part); such a computation counts as one reduce-scatter of its result.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional

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
    channels: set = set()
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            in_fused_reduce_scatter = header.group(1).startswith(_FUSED_REDUCE_SCATTER)
            if in_fused_reduce_scatter:
                out["reduce-scatter"]["count"] += 1
                out["reduce-scatter"]["bytes"] += shape_bytes(header.group(2))
            continue
        hit = _INSTRUCTION.match(line)
        if hit is None or hit.group(3) == "-start" or in_fused_reduce_scatter or _repeated_channel(line, channels):
            continue
        shape, kind = hit.group(1), hit.group(2)
        out[kind]["count"] += 1
        out[kind]["bytes"] += shape_bytes(shape)
    return out


_CHANNEL = re.compile(r"\bchannel_id=(\d+)")


def _repeated_channel(line: str, seen: set) -> bool:
    """Whether this collective's channel was seen before: the TPU compiler splits one async collective into pieces
    (an AsyncCollectiveStart fusion and continuations fused into compute) that share its channel_id."""
    hit = _CHANNEL.search(line)
    if hit is None:
        return False
    if hit.group(1) in seen:
        return True
    seen.add(hit.group(1))
    return False


def custom_calls(hlo_text: str) -> dict:
    """{custom-call target: count} of the program (Mosaic kernels are MOSAIC_TARGET)."""
    return dict(Counter(_CUSTOM_CALL.findall(hlo_text)))


def mosaic_kernels(hlo_text: str) -> int:
    return custom_calls(hlo_text).get(MOSAIC_TARGET, 0)


# ------------------------------------------------------------------------------------ executed traffic
_CALLEE = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_CONSTANT = re.compile(r"=\s*s(?:32|64)\[\]\S*\s+constant\((\d+)\)")
_LESS_THAN = re.compile(r"compare\(.*direction=LT")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_FUSED_OPERANDS = re.compile(r"^(?:ENTRY\s+)?%?[\w.\-]+\s*\((.*)\)\s*->")


def _computations(hlo_text: str) -> list[tuple[str, str, list[str]]]:
    """[(name, header line, body lines)] in the order of the text (callees are defined before their callers)."""
    out, current = [], None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = (header.group(1), line, [])
            out.append(current)
        elif current is not None:
            if line.startswith("}"):
                current = None
            else:
                current[2].append(line)
    return out


def trip_count(condition_lines: list[str]) -> Optional[int]:
    """N of a loop whose condition is `counter < N` with N a constant (jax's scans and fori_loops from 0);
    None for a data-dependent bound."""
    if not any(_LESS_THAN.search(line) for line in condition_lines):
        return None
    constants = [int(hit.group(1)) for line in condition_lines for hit in [_CONSTANT.search(line)] if hit]
    return constants[0] if len(constants) == 1 else None


def execution_counts(hlo_text: str) -> dict[str, int]:
    """{computation: how many times one run of the program executes it}: 1 for the entry, the trip count of its
    loop for a while body (1 where the bound is not a constant), summed over callers."""
    comps = _computations(hlo_text)
    lines = {name: body for name, _, body in comps}
    counts = {name: 0 for name, _, _ in comps}
    for name, header, _ in comps:
        if header.startswith("ENTRY"):
            counts[name] = 1
    for name, _, body in reversed(comps):  # callers before callees
        runs = counts[name]
        if not runs:
            continue
        for line in body:
            loop = _WHILE.search(line)
            if loop:
                condition, loop_body = loop.groups()
                n = trip_count(lines.get(condition, []))
                counts[loop_body] = counts.get(loop_body, 0) + runs * (1 if n is None else n)
                counts[condition] = counts.get(condition, 0) + runs * (1 if n is None else n + 1)
                continue
            for callee in _CALLEE.findall(line):
                counts[callee] = counts.get(callee, 0) + runs
            branches = _BRANCHES.search(line)
            if branches:
                for callee in re.findall(r"%?([\w.\-]+)", branches.group(1)):
                    counts[callee] = counts.get(callee, 0) + runs
    return counts


def group_size(line: str, default: int) -> int:
    """Devices in each replica group of a collective instruction (`default` when the text does not say)."""
    hit = _MESH_GROUPS.search(line)
    if hit:
        sizes = dict((k.strip().strip("'"), int(v)) for k, v in
                     (item.split("=") for item in hit.group(1).split(",") if "=" in item))
        size = 1
        for axis in (a.strip().strip("'") for a in hit.group(2).split(",") if a.strip()):
            size *= sizes.get(axis, 1)
        return size
    hit = _LIST_GROUPS.search(line)
    if hit:
        return len([x for x in hit.group(1).split(",") if x])
    hit = _IOTA_GROUPS.search(line)
    if hit:
        return int(hit.group(1).split(",")[-1])
    return default


def _ring_bytes(kind: str, result_bytes: float, n: int) -> float:
    """Bytes one chip receives in a ring collective of `n` devices with this result size."""
    if n <= 1:
        return 0.0
    if kind == "all-gather":
        return result_bytes * (n - 1) / n
    if kind == "reduce-scatter":
        return result_bytes * (n - 1)
    if kind == "all-reduce":
        return 2.0 * result_bytes * (n - 1) / n
    if kind == "all-to-all":
        return result_bytes * (n - 1) / n
    return result_bytes  # collective-permute


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def collective_traffic(hlo_text: str, num_devices: int, top: Optional[list] = None) -> dict:
    """{kind: {"executions": n, "bytes": result bytes, "received_bytes": per chip}} of one run of the program:
    each collective counted as often as its computation runs (`execution_counts`), received bytes by the ring
    formulas of `_ring_bytes`. Loops with a data-dependent bound count once.

    `top`, a list, receives one dict per collective instruction (kind, shape, group, executions, received_bytes,
    op_name: the jax operation it serves), largest traffic first."""
    counts = execution_counts(hlo_text)
    out = {kind: {"executions": 0, "bytes": 0.0, "received_bytes": 0.0} for kind in COLLECTIVES}
    rows = []
    channels: set = set()
    for name, header, body in _computations(hlo_text):
        runs = counts.get(name, 0)
        if not runs:
            continue
        if name.startswith(_FUSED_REDUCE_SCATTER):  # one reduce-scatter: operands -> results
            result = shape_bytes(_COMPUTATION.match(header).group(2))
            operands = shape_bytes(_FUSED_OPERANDS.match(header).group(1))
            n = max(1, round(operands / result)) if result else 1
            entry = out["reduce-scatter"]
            entry["executions"] += runs
            entry["bytes"] += runs * result
            entry["received_bytes"] += runs * _ring_bytes("reduce-scatter", result, n)
            rows.append({"kind": "reduce-scatter", "shape": _COMPUTATION.match(header).group(2)[:120], "group": n,
                         "executions": runs, "received_bytes": runs * _ring_bytes("reduce-scatter", result, n),
                         "op_name": name})
            continue
        starts = {}  # async pairs: the replica groups are written on the -start, the result shape on the -done
        for line in body:
            hit = _INSTRUCTION.match(line)
            if hit is not None and hit.group(3) == "-start":
                starts[_NAME.match(line).group(1)] = line
        for line in body:
            hit = _INSTRUCTION.match(line)
            if hit is None or hit.group(3) == "-start" or _repeated_channel(line, channels):
                continue
            kind, size = hit.group(2), shape_bytes(hit.group(1))
            group_line = line
            if hit.group(3) == "-done":
                operand = re.search(r"-done\(%?([\w.\-]+)", line)
                group_line = starts.get(operand.group(1), line) if operand else line
            n = group_size(group_line, num_devices)
            entry = out[kind]
            entry["executions"] += runs
            entry["bytes"] += runs * size
            entry["received_bytes"] += runs * _ring_bytes(kind, size, n)
            op = _OP_NAME.search(line)
            rows.append({"kind": kind, "shape": re.sub(r"\{[^}]*\}", "", hit.group(1))[:120], "group": n,
                         "executions": runs, "received_bytes": runs * _ring_bytes(kind, size, n),
                         "op_name": op.group(1) if op else ""})
    if top is not None:
        top.extend(sorted(rows, key=lambda r: -r["received_bytes"]))
    return out
