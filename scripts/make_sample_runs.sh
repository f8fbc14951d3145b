#!/usr/bin/env bash
# Re-make the sample runs in sample_checkpoints/runs/ (about 3 minutes on a 2-core CPU).
#
# Same seed, data and runner defaults for every method (the defaults were chosen once, for
# full fine-tuning; see README "Fine-tuning"). Checkpoints at steps 75 and 150, in bf16, and
# only for the LLM's last block MLP and the projector, so that all seven runs stay small
# (statistics in layers.jsonl still cover every parameter).
#
# Usage: bash scripts/make_sample_runs.sh   (from the repository root, after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=sample_checkpoints/runs
# the old runs stay aside until every new one is done (and come back if one fails)
rm -rf "$OUT.old"
if [ -d "$OUT" ]; then mv "$OUT" "$OUT.old"; fi
trap 'rm -rf "$OUT"; if [ -d "$OUT.old" ]; then mv "$OUT.old" "$OUT"; fi' EXIT
COMMON=(--model sample_checkpoints/tiny-llava-base --data builtin:counting --seed 0
        --save-every 75 --save-dtype bfloat16
        --save-tensors 'language_model\.layers\.3\.mlp|multi_modal_projector')
for method in spider full magnitude_mask l2 dare lora; do
  echo "== $method" >&2
  $PY -m spider.train "${COMMON[@]}" --method "$method" --output-dir "$OUT/$method"
done
echo "== hybrid (full + 25 % upstream data)" >&2
$PY -m spider.train "${COMMON[@]}" --method full --hybrid-ratio 0.25 --output-dir "$OUT/hybrid"
trap - EXIT
rm -rf "$OUT.old"
du -sh "$OUT"
