"""The tables of docs/tpu.md from the JSON reports of bench/tpu_presets.sh (bench/results/tpu/*.json).

    python bench/tpu_table.py [bench/results/tpu]
"""
from __future__ import annotations

import glob
import json
import os
import sys

GiB = 1024 ** 3
ORDER = ("7b_train_v6e16", "7b_train_v6e16_seq32k", "7b_multimodal_v6e16", "7b_train_v5p8", "3b_train_v5e8",
         "7b_prefill_v5e8", "7b_decode_v5e8", "7b_paged_decode_v5e8", "7b_paged_decode_v5e8_dp2",
         "7b_talker_decode_v5e8", "7b_token2wav_v5e8",
         "7b_prefill_v6e8", "7b_decode_v6e8", "7b_paged_decode_v6e8", "7b_talker_decode_v6e8", "7b_token2wav_v6e8")


def describe(r: dict) -> str:
    s = r["shapes"]
    job = r["job"]
    if job == "train":
        media = " + media" if any(k in s for k in ("audio_chunks", "image_patches", "video_patches")) else ""
        return f"train {s['batch']} x {s['seq_len']}{media}"
    if job == "prefill":
        return f"prefill {s['batch']} x {s['seq_len']} into {s['max_len']} slots"
    if job == "paged-decode":
        return (f"paged decode step, {s['batch']} slots x {s['seq_len']} tokens on average (rows up to "
                f"{s['max_len']}, pages of {s['page_size']})")
    if job in ("decode", "talker-decode"):
        return f"{job} step, {s['batch']} rows over {s['max_len']} slots"
    return f"token2wav round, {s['batch']} rows"


def main(folder: str) -> None:
    reports = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(os.path.join(folder, "*.json"))}
    names = [n for n in ORDER if n in reports] + sorted(set(reports) - set(ORDER))
    print("| run | program | topology, mesh | arguments | temporaries | total | HBM | fits | Mosaic kernels | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = reports[name]
        m = r["per_device_bytes"]
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 chip"
        g = lambda key: "" if m.get(key) is None else f"{m[key] / GiB:.2f}"  # noqa: E731
        print(f"| {name} | {describe(r)} | {r['topology']}, {mesh} | {g('arguments')} | {g('temporaries')} | "
              f"{g('total')} | {r['hbm_bytes'] / GiB:.0f} | {'yes' if r['fits'] else 'NO'} | {r['mosaic_kernels']} "
              f"| {r['compile_s']:.0f} |")
    print()
    print("| run | model TFLOP per chip | compute ms | HBM ms | ICI GiB per chip | ICI ms | step >= ms | MFU <= "
          "| tokens/s/chip <= |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r, line = reports[name], reports[name].get("roofline")
        if not line:
            continue
        ici = "" if line["ici_s"] is None else f"{line['ici_s'] * 1e3:.1f}"
        print(f"| {name} | {line['model_flops_per_chip'] / 1e12:.1f} | {line['compute_s'] * 1e3:.1f} | "
              f"{line['hbm_s'] * 1e3:.1f} | {line['ici_bytes_per_chip'] / GiB:.2f} | {ici} | "
              f"{line['bound_s'] * 1e3:.1f} | {100 * line['mfu_bound']:.1f}% | "
              f"{line['tokens_per_s_per_chip_bound']:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/tpu")
