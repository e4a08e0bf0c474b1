#!/usr/bin/env bash
# Compile every TPU preset and target shape of docs/tpu.md with `omni-jax compile` (libtpu, no TPU needed) and
# write one JSON report each under bench/results/tpu/. Run from the repository root with the project's venv:
#   bash bench/tpu_presets.sh [NAME ...]      # all, or only the named ones
# Each 7B compile takes one to several minutes on a 2-core host; a released-size token2wav round over 20.
set -uo pipefail
OUT=bench/results/tpu
mkdir -p "$OUT"
OMNI=${OMNI:-.venv/bin/omni-jax}
M7=configs/models/qwen2_5_omni_7b.yaml
S5=configs/serve/qwen2_5_omni_7b_v5e8.yaml
S6=configs/serve/qwen2_5_omni_7b_v6e8.yaml
declare -A RUNS=(
  [7b_multimodal_v6e16]="--topology v6e:4x4 --job train --train-config configs/train/qwen2_5_omni_7b_multimodal_v6e16.yaml"
  [7b_train_v6e16]="--topology v6e:4x4 --job train --train-config configs/train/qwen2_5_omni_7b_v6e16.yaml"
  [7b_train_v6e16_seq32k]="--topology v6e:4x4 --job train --train-config configs/train/qwen2_5_omni_7b_v6e16.yaml --seq-len 32768"
  [7b_train_v5p8]="--topology v5p:2x2x1 --job train --train-config configs/train/qwen2_5_omni_7b_v5p8.yaml"
  [3b_train_v5e8]="--topology v5e:2x4 --job train --train-config configs/train/qwen2_5_omni_3b_v5e8.yaml"
  [7b_prefill_v5e8]="--topology v5e:2x4 --job prefill --serve-config $S5"
  [7b_decode_v5e8]="--topology v5e:2x4 --job decode --serve-config $S5"
  [7b_paged_decode_v5e8]="--topology v5e:2x4 --job paged-decode --serve-config $S5"
  [7b_paged_decode_v5e8_dp2]="--topology v5e:2x4 --job paged-decode --serve-config $S5 --mesh data=2,fsdp=1,tensor=4"
  [7b_talker_decode_v5e8]="--topology v5e:2x4 --job talker-decode --serve-config $S5"
  [7b_token2wav_v5e8]="--topology v5e:2x4 --job token2wav --serve-config $S5"
  [7b_prefill_v6e8]="--topology v6e:2x4 --job prefill --serve-config $S6"
  [7b_decode_v6e8]="--topology v6e:2x4 --job decode --serve-config $S6"
  [7b_paged_decode_v6e8]="--topology v6e:2x4 --job paged-decode --serve-config $S6"
  [7b_talker_decode_v6e8]="--topology v6e:2x4 --job talker-decode --serve-config $S6"
  [7b_token2wav_v6e8]="--topology v6e:2x4 --job token2wav --serve-config $S6"
)
ORDER=(7b_train_v6e16 7b_train_v6e16_seq32k 7b_multimodal_v6e16 7b_train_v5p8 3b_train_v5e8
       7b_prefill_v5e8 7b_decode_v5e8 7b_paged_decode_v5e8 7b_paged_decode_v5e8_dp2 7b_talker_decode_v5e8 7b_token2wav_v5e8
       7b_prefill_v6e8 7b_decode_v6e8 7b_paged_decode_v6e8 7b_talker_decode_v6e8 7b_token2wav_v6e8)
[ $# -gt 0 ] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  echo "== $name: omni-jax compile ${RUNS[$name]}"
  $OMNI compile ${RUNS[$name]} --json "$OUT/$name.json"
  echo "== $name: exit $?"
done
