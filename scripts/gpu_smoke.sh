#!/usr/bin/env bash
# GPU smoke test: on a machine with a GPU, train a small transformer for a few hundred updates in
# fp16 (fairseq's --bf16 means TPU mode), score every pair in bf16 (fp16 where bf16 is missing), and
# print tokens/s for training and scoring.
#   scripts/gpu_smoke.sh [RUN_DIR]          (default runs/gpu-smoke; needs .venv, see scripts/setup.sh)
#   scripts/gpu_smoke.sh --cpu-check [DIR]  the same steps with a tiny fp32 model on CPU, to check the script
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py=.venv/bin/python
if [ "${1:-}" = "--cpu-check" ]; then
  run="${2:-runs/gpu-smoke-cpu}"
  prec=fp32
  score_prec=fp32
  sets=(--run-dir "$run" --set download.source=synthetic --set download.synthetic_train_per_pair=500
        --set download.max_valid_per_pair=50 --set download.max_test_per_pair=50 --set prepare.vocab_size=500
        --set "proxy.seeds=[1]" --set "proxy.checkpoints=[40,80]" --set proxy.warmup_updates=20
        --set score.device=cpu --set score.precision=fp32)
else
  run="${1:-runs/gpu-smoke}"
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: no GPU visible to torch')"
  prec=fp16
  score_prec=fp16  # score.precision auto on a GPU
  sets=(--run-dir "$run"
        --set download.source=synthetic --set download.synthetic_train_per_pair=20000
        --set download.max_valid_per_pair=200 --set download.max_test_per_pair=200
        --set prepare.vocab_size=8000
        --set model.encoder_layers=6 --set model.decoder_layers=6 --set model.embed_dim=512
        --set model.ffn_dim=2048 --set model.attention_heads=8
        --set "proxy.seeds=[1]" --set "proxy.checkpoints=[200,400]" --set proxy.warmup_updates=100
        --set proxy.max_tokens=8192 --set proxy.lr=0.0007 --set proxy.precision="$prec"
        --set score.device=cuda --set score.precision="$score_prec" --set score.batch_tokens=32000
        --set score.chunk_tokens=8192)
fi
for stage in download prepare proxy score; do
  .venv/bin/mtprune "$stage" "${sets[@]}" -q
done
"$py" - "$run" "$prec" "$score_prec" <<'PY'
import json, re, sys
from pathlib import Path
run, prec, score_prec = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
wps = [float(m) for m in re.findall(r"\| wps ([\d.]+)", (run / "03_proxy/seed1/train.log").read_text())]
score = json.loads((run / "04_score/manifest.json").read_text())["stats"]
import torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(f"device: {device}; training in {prec}, scoring in {score_prec}")
print(f"training: {max(wps):,.0f} target tokens/s (fairseq wps, best logged interval)")
print(f"scoring:  {score['target_tokens_per_second']:,.0f} target tokens/s "
      f"({score['sentences_per_second']:,.0f} sentences/s x {score['checkpoints_scored']} checkpoints)")
PY
