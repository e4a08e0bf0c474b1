"""The compile report: per-chip memory from the compiler's memory analysis, whether it fits the chip's HBM,
Mosaic kernels and collectives from the HLO; as JSON and as a short printed table.

Memory is per device (the compiled program is the SPMD program of one chip). The peak estimate is

    total = arguments + outputs - aliased + temporaries

as MaxText's `print_compiled_memory_stats` computes it: arguments (params, optimizer state, inputs) and outputs
are live together except where an output reuses a donated argument's buffer (aliased, counted once), and the
temporaries are the compiler's scratch peak on top. The program's code (`generated_code_bytes`) is reported
beside it, not added.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

from omni_jax.tpu_compile import hlo, roofline

GiB = 1024 ** 3  # printed sizes are GiB (HBM comes in binary units); JSON holds bytes


@dataclasses.dataclass
class CompileReport:
    job: str
    topology: str
    num_slices: int
    device_kind: str
    chips: int
    mesh: dict  # {"data": .., "fsdp": .., "tensor": ..}
    shapes: dict  # the job's shapes (batch, seq_len, ...) and parameter count
    options: dict  # dtype, param_dtype, attention_backend, remat_policy, ...
    hbm_bytes: Optional[int]  # per chip (device)
    per_device_bytes: dict  # arguments, outputs, temporaries, aliased, total
    generated_code_bytes: int
    fits: Optional[bool]  # None when the chip's HBM is unknown
    mosaic_kernels: int
    custom_calls: dict
    collectives: dict
    compile_s: float
    # collectives as one run of the program executes them (loops counted per iteration) with the bytes each chip
    # receives (hlo.collective_traffic), and the roofline built on them (roofline.py); None: not modelled
    collective_traffic: Optional[dict] = None
    top_collectives: Optional[list] = None  # the 10 collective instructions that move the most bytes per chip
    roofline: Optional[dict] = None
    compiler_error: Optional[str] = None  # first line of a resource-exhausted compile
    compiler_hbm_bytes: Optional[int] = None  # the HBM the compiler said it may use (a refusal's own number)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    @property
    def shortfall_message(self) -> str:
        """"does not fit: needs X GiB per chip of Y GiB" (the CLI's message for exit code 3)."""
        need = self.per_device_bytes.get("total")
        hbm = self.compiler_hbm_bytes or self.hbm_bytes
        have = "an unknown HBM size" if hbm is None else f"{hbm / GiB:.2f} GiB"
        if not need:
            text = f"does not fit: needs more than {have} per chip"
        else:  # a compiler refusal states one part of the need (e.g. its temporaries): a lower bound
            least = "at least " if self.compiler_error else ""
            text = f"does not fit: needs {least}{need / GiB:.2f} GiB per chip of {have}"
        if self.compiler_error:
            text += f" (compiler: {self.compiler_error})"
        return text

    def table(self) -> str:
        """A short human summary (GiB per chip)."""
        mem = self.per_device_bytes
        gb = lambda key: f"{mem[key] / GiB:.2f}" if mem.get(key) is not None else "?"  # noqa: E731
        hbm = "?" if self.hbm_bytes is None else f"{self.hbm_bytes / GiB:.2f}"
        mesh = ",".join(f"{axis}={size}" for axis, size in self.mesh.items())
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        shapes = " ".join(f"{k}={v}" for k, v in self.shapes.items() if k != "params")
        comms = ", ".join(f"{kind} {c['count']} ({c['bytes'] / 1e6:.1f} MB)"
                          for kind, c in self.collectives.items() if c["count"]) or "none"
        comms += "  (instructions in the program text; a scanned layer's count once)"
        if self.compiler_error:
            comms = "n/a (the compiler refused the program)"
        fits = {True: "yes", False: "NO", None: "unknown (HBM size unknown: pass --hbm-gib)"}[self.fits]
        rows = [
            ("job", f"{self.job}  ({shapes}; {self.shapes.get('params', 0) / 1e9:.3f} B params)"),
            ("topology", f"{self.topology}{slices}: {self.chips} x {self.device_kind}"),
            ("mesh", mesh),
            ("options", " ".join(f"{k}={v}" for k, v in self.options.items())),
            ("per chip GiB", f"arguments {gb('arguments')}  outputs {gb('outputs')}  temporaries {gb('temporaries')}"
                            f"  aliased {gb('aliased')}  total {gb('total')}"),
            ("HBM GiB", hbm),
            ("fits", fits),
            ("mosaic kernels", str(self.mosaic_kernels)),
            ("collectives", comms),
        ]
        if self.collective_traffic:
            moved = sum(c["received_bytes"] for c in self.collective_traffic.values())
            rows.append(("ICI traffic", f"{moved / GiB:.2f} GiB received per chip in one run (loops counted)"))
        if self.roofline:
            r = self.roofline
            ici = "?" if r["ici_s"] is None else f"{r['ici_s'] * 1e3:.1f}"
            rows.append(("roofline", f"compute {r['compute_s'] * 1e3:.1f} ms, HBM {r['hbm_s'] * 1e3:.1f} ms, ICI {ici} "
                                     f"ms -> step >= {r['bound_s'] * 1e3:.1f} ms, MFU <= {100 * r['mfu_bound']:.1f}%, "
                                     f"<= {r['tokens_per_s_per_chip_bound']:,.0f} tokens/s/chip"))
        rows.append(("compile", f"{self.compile_s:.1f} s"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def memory_bytes(compiled) -> tuple[dict, int]:
    """(per_device_bytes, generated code bytes) from `compiled.memory_analysis()`."""
    stats = compiled.memory_analysis()
    arguments = int(stats.argument_size_in_bytes)
    outputs = int(stats.output_size_in_bytes)
    aliased = int(stats.alias_size_in_bytes)
    temporaries = int(stats.temp_size_in_bytes)
    total = arguments + outputs - aliased + temporaries
    return ({"arguments": arguments, "outputs": outputs, "temporaries": temporaries, "aliased": aliased,
             "total": total}, int(stats.generated_code_size_in_bytes))


def build_report(compiled, *, compile_s: float, program=None, **fields: Any) -> CompileReport:
    """The report of a compiled program (fields: job, topology, num_slices, device_kind, chips, mesh, shapes,
    options, hbm_bytes); with the `programs.Program`, also its roofline."""
    per_device, code = memory_bytes(compiled)
    text = compiled.as_text()
    hbm = fields["hbm_bytes"]
    top: list = []
    traffic = hlo.collective_traffic(text, fields["chips"], top)
    bound = None
    if program is not None and program.model_flops is not None:
        hbm_bytes = per_device["arguments"] + program.hbm_extra_bytes
        if program.reads_outputs:
            hbm_bytes += per_device["outputs"]
        line = roofline.roofline(fields["device_kind"], fields["chips"], program.model_flops, hbm_bytes,
                                 sum(c["received_bytes"] for c in traffic.values()), program.tokens)
        bound = None if line is None else dataclasses.asdict(line)
    return CompileReport(per_device_bytes=per_device, generated_code_bytes=code,
                         fits=None if hbm is None else per_device["total"] <= hbm,
                         mosaic_kernels=hlo.mosaic_kernels(text), custom_calls=hlo.custom_calls(text),
                         collectives=hlo.collectives(text), collective_traffic=traffic, top_collectives=top[:10], roofline=bound,
                         compile_s=round(compile_s, 2), **fields)


_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4, "P": 1024 ** 5}
# "the total memory required for HLO temporaries (226.01G) exceeds available HBM (15.75G)" /
# "Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G."
_NEEDS_OF = (re.compile(r"\(([\d.]+)([KMGTP]?)i?B?\)\s+exceeds available HBM \(([\d.]+)([KMGTP]?)i?B?\)", re.I),
             re.compile(r"Used ([\d.]+)([KMGTP]?)i?B? of ([\d.]+)([KMGTP]?)i?B? hbm", re.I))


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds available HBM" in text


def out_of_memory_report(error: BaseException, *, compile_s: float, **fields: Any) -> CompileReport:
    """The report of a compile the compiler refused for lack of HBM, with its numbers when it states them
    (XLA prints binary units: "G" = GiB)."""
    text = str(error)
    first = next((line.strip() for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line or "HBM" in line
                  or "hbm" in line), text.strip().splitlines()[0] if text.strip() else type(error).__name__)
    needs = None
    for pattern in _NEEDS_OF:
        hit = pattern.search(text)
        if hit:
            needs = int(float(hit.group(1)) * _UNITS[hit.group(2).upper()])
            available = int(float(hit.group(3)) * _UNITS[hit.group(4).upper()])
            fields["compiler_hbm_bytes"] = available
            break
    empty = {"arguments": None, "outputs": None, "temporaries": None, "aliased": None, "total": needs}
    return CompileReport(per_device_bytes=empty, generated_code_bytes=0, fits=False, mosaic_kernels=0,
                         custom_calls={}, collectives={}, compile_s=round(compile_s, 2),
                         compiler_error=first.replace("jax.errors.JaxRuntimeError: ", ""), **fields)
