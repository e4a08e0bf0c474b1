"""A roofline of one compiled program: lower bounds on its time from the chip's peak compute, HBM bandwidth and
ICI bandwidth, and the bounds on MFU and tokens per second per chip that follow.

    compute_s = model FLOPs per chip / peak bf16 FLOP/s
    hbm_s     = bytes that must cross HBM per chip / HBM bandwidth
    ici_s     = bytes each chip receives in the program's collectives / (ICI bandwidth per chip / 2)
    bound_s   = max(compute_s, hbm_s, ici_s)          (perfect overlap: no step runs faster)
    mfu_bound = compute_s / bound_s

Model FLOPs are counted from the model's shapes, as MFU is (MaxText's convention): 2 FLOPs per weight per token
forward, 6 for a trained step (forward + backward), attention 4 * T * S * heads * head_dim per layer forward
(T queries against S keys; causal self-attention counts half of its T x T), the lm_head included, the embedding
lookup not; remat's recomputation is not model work. A frozen encoder runs forward only (train/step.py keeps it
off the gradient path); encoder attention is not counted (windowed, small next to the LM).

HBM bytes are a lower bound from the program's memory plan: a decode or prefill step reads every argument (weights,
KV cache, state) at least once; a train step reads and writes its state (arguments + outputs) and reads the
gathered weights in the compute dtype once per pass (forward, the remat recomputation, backward). Activations
that spill are not counted, so hbm_s is optimistic.

ICI bytes: every collective of the HLO (hlo.collective_traffic), executed as often as the loops around it run,
as ring algorithms move data: an all-gather brings (n-1)/n of its result to each chip, a reduce-scatter n-1
times its result, an all-reduce 2 (n-1)/n of its size, an all-to-all (n-1)/n, a permute all of it. The chip's
ICI bandwidth is the published bidirectional figure; half of it comes in. Collectives that cross slices (DCN)
are counted as ICI, so multi-slice times are optimistic.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

# Public per-chip figures (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): peak bf16 FLOP/s, HBM bytes/s,
# ICI bytes/s per chip (bidirectional; None where the page gives none).
CHIP_SPECS = {
    "TPU v4": (275e12, 1200e9, None),
    "TPU v5 lite": (197e12, 819e9, 400e9),  # v5e
    "TPU v5e": (197e12, 819e9, 400e9),
    "TPU v5": (459e12, 2765e9, 1200e9),  # v5p
    "TPU v5p": (459e12, 2765e9, 1200e9),
    "TPU v6 lite": (918e12, 1638e9, 800e9),  # v6e (Trillium)
    "TPU v6e": (918e12, 1638e9, 800e9),
}


@dataclasses.dataclass
class Roofline:
    model_flops_per_chip: float
    hbm_bytes_per_chip: float
    ici_bytes_per_chip: float
    peak_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: Optional[float]
    compute_s: float
    hbm_s: float
    ici_s: Optional[float]
    bound_s: float
    mfu_bound: float
    tokens_per_step: int  # tokens the step processes (train, prefill) or emits (decode: one per row)
    tokens_per_s_per_chip_bound: float

    def line(self) -> str:
        ici = "?" if self.ici_s is None else f"{self.ici_s * 1e3:.2f}"
        return (f"compute {self.compute_s * 1e3:.2f} ms, HBM {self.hbm_s * 1e3:.2f} ms, ICI {ici} ms -> at least "
                f"{self.bound_s * 1e3:.2f} ms a step; MFU <= {100 * self.mfu_bound:.1f}%, <= "
                f"{self.tokens_per_s_per_chip_bound:,.0f} tokens/s/chip")


def roofline(device_kind: str, chips: int, model_flops: float, hbm_bytes_per_chip: float,
             ici_bytes_per_chip: float, tokens_per_step: int) -> Optional[Roofline]:
    """The roofline of a program on `chips` chips of `device_kind` (None for a chip without published specs).
    model_flops is for the whole step (all chips)."""
    if device_kind not in CHIP_SPECS:
        return None
    peak, hbm_bw, ici_bw = CHIP_SPECS[device_kind]
    flops = model_flops / chips
    compute_s, hbm_s = flops / peak, hbm_bytes_per_chip / hbm_bw
    ici_s = None if ici_bw is None else ici_bytes_per_chip / (ici_bw / 2)
    bound = max(compute_s, hbm_s, ici_s or 0.0)
    return Roofline(model_flops_per_chip=flops, hbm_bytes_per_chip=float(hbm_bytes_per_chip),
                    ici_bytes_per_chip=float(ici_bytes_per_chip), peak_flops=peak, hbm_bytes_per_s=hbm_bw,
                    ici_bytes_per_s=ici_bw, compute_s=compute_s, hbm_s=hbm_s, ici_s=ici_s, bound_s=bound,
                    mfu_bound=compute_s / bound if bound else 0.0, tokens_per_step=int(tokens_per_step),
                    tokens_per_s_per_chip_bound=tokens_per_step / chips / bound if bound else 0.0)


# ------------------------------------------------------------------------------------------- model FLOPs
def decoder_flops(text_config, tokens: int, attended: float, forward_only: bool,
                  head_tokens: Optional[int] = None) -> float:
    """FLOPs of a decoder LM over `tokens` tokens whose attention covers `attended` query-key pairs per layer
    and head (summed over rows): 2 (or 6) per matmul weight per token + 4 (or 12) * attended * head_dim; the
    output head over `head_tokens` (default: every token; generation's prefill: the last of each row)."""
    c = text_config
    hidden, inter, heads, kv, d = c.hidden_size, c.intermediate_size, c.num_attention_heads, \
        c.num_key_value_heads, c.head_dim
    per_layer = hidden * heads * d * 2 + hidden * kv * d * 2 + 3 * hidden * inter  # q, o, k, v, gate/up/down
    head_tokens = tokens if head_tokens is None else head_tokens
    factor = 1 if forward_only else 3
    return factor * (2.0 * c.num_hidden_layers * per_layer * tokens + 2.0 * hidden * c.vocab_size * head_tokens
                     + 4.0 * attended * heads * d * c.num_hidden_layers)


def causal_pairs(rows: int, length: int) -> float:
    """Query-key pairs of causal self-attention over rows of `length` (half the square, as MaxText counts)."""
    return rows * length * length / 2.0


def encoder_flops(weights: int, tokens: int, forward_only: bool) -> float:
    """2 (or 6) FLOPs per weight per input position of an encoder (attention not counted)."""
    return (2.0 if forward_only else 6.0) * weights * tokens
