#!/usr/bin/env bash
# Re-make the sample runs in sample_checkpoints/runs/: one per registered method
# (spider.methods.available_methods()) plus data-hybrid, one after another (35 minutes on this
# project's busy, shared 2-core machine). sample_checkpoints/README.md lists their scores.
#
# Same seed, data and runner defaults for every run (the defaults were chosen once, for full
# fine-tuning; see README "Fine-tuning"); method options are the library's defaults except
# l2's lambda and hft's rounds (below). Checkpoints at steps 75 and 150, in bf16. They keep:
#   - `spider`: every trainable tensor (LLM and projector, 1.35 M parameters: its weights and
#     S, 5.4 MB a checkpoint), so the app's Parameters page can show any of them;
#   - `full`: every trainable tensor as well (weights only), so its forgetting can be
#     attributed by reverting (`python -m analysis.attribute`, run below for both);
#   - every other run: the LLM's last block down projection and the projector only, so that
#     the runs stay about 28 MiB (the repository's budget is 40 MiB in all).
# The statistics in layers.jsonl cover every parameter of every run.
#
# l2 runs at lam = 10000, not the library's 1e-3 (the option's help says why). The penalty is lam * sum over tensors of
# mean((p - theta0)^2); its gradient, 2 * lam * (p - theta0) / numel(p), is divided by the
# tensor's size (25,600-71,680 entries in most tensors here), so at lam = 1e-3 the run equals
# full fine-tuning (the same U to 16 digits). lam of the order of a tensor's size weighs like
# the classic per-weight L2-SP. Measured here (U, D at step 150; distance moved from theta0 as
# a share of full's): 1e-3: 0.66, 0.36, 1.00; 10: 0.70, 0.36, 0.93; 100: 0.78, 0.35, 0.80;
# 1000: 0.90, 0.30, 0.47; 10000: 0.95, 0.37, 0.22.
#
# The component-selective and later methods' runs (dowser, spider-attn, full-mlp_gate_up, lwf)
# keep the tensors they train in the last block (SOME misses them: attn and gate/up runs do not
# train down_proj or the projector).
#
# Usage: bash scripts/make_sample_runs.sh          every run, from scratch (the old stay aside)
#        bash scripts/make_sample_runs.sh NAME...  only the named runs, added next to the others
#                                                  (each must not exist yet), e.g. `lwf`
# (from the repository root, after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# One thread unless told otherwise: the samples were made so (the thread count moves the few
# SPIDER entries that sit at the tie I = G), and on a busy shared machine one thread per run
# is far faster than two fighting for the same cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT=sample_checkpoints/runs
L2_LAMBDA=10000
ONLY=("$@")
if [ ${#ONLY[@]} -eq 0 ]; then
  # the old runs stay aside until every new one is done (and come back if one fails)
  rm -rf "$OUT.old"
  if [ -d "$OUT" ]; then mv "$OUT" "$OUT.old"; fi
  trap 'rm -rf "$OUT"; if [ -d "$OUT.old" ]; then mv "$OUT.old" "$OUT"; fi' EXIT
fi
COMMON=(--model sample_checkpoints/tiny-llava-base --data builtin:counting --seed 0
        --save-every 75 --save-dtype bfloat16)
SOME=(--save-tensors 'language_model\.layers\.3\.mlp\.down_proj|multi_modal_projector')
LAST_ATTN=(--save-tensors 'language_model\.layers\.3\.self_attn\.(q|o)_proj')
LAST_GATE_UP=(--save-tensors 'language_model\.layers\.3\.mlp\.(gate|up)_proj')
sample() {  # sample NAME FLAGS...
  local name=$1 start=$SECONDS
  shift
  if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " =~ " $name " ]]; then return 0; fi
  echo "== $name" >&2
  $PY -m spider.train "${COMMON[@]}" "$@" --output-dir "$OUT/$name"
  echo "== $name took $((SECONDS - start)) s" >&2
}
sample spider --method spider  # every trainable tensor
# every trainable tensor too (weights only, 2.7 MB a checkpoint): `python -m analysis.attribute`
# needs them to revert each part of the update, and full fine-tuning is the run that forgets
sample full --method full
for method in magnitude_mask random_mask dare wise_ft tailor lora; do
  sample "$method" --method "$method" "${SOME[@]}"
done
# hft in rounds of 60 steps (a fresh random half frozen per round, as the method is meant);
# its default, one round for the whole run, is random_mask with another random draw. 60, not 50 or
# 75: no checkpoint falls on a round boundary, where the saved mask is the next round's.
sample hft --method hft --option round_steps=60 "${SOME[@]}"
sample l2 --method l2 --option "lam=$L2_LAMBDA" "${SOME[@]}"
sample hybrid --method full --hybrid-ratio 0.25 "${SOME[@]}"  # full + 25 % upstream data
# Model-Dowser with its defaults (scores once on 64 self-generated prompts, ~1-2 minutes here;
# cached under ~/.cache/spiderscope/dowser): the last block's down projection is masked
sample dowser --method dowser "${SOME[@]}"
# component-selective training ("How to Teach LMMs New Skills"): attention only, gate/up only
sample spider-attn --method spider --train attn "${LAST_ATTN[@]}"
sample full-mlp_gate_up --method full --train mlp_gate_up "${LAST_GATE_UP[@]}"
sample lwf --method lwf "${SOME[@]}"  # Learning without Forgetting, lam 1, T 2
# attribution by reverting at the last checkpoint, for the two runs that keep every tensor
for name in spider full; do
  if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " =~ " $name " ]]; then continue; fi
  for by in component layer module; do
    $PY -m analysis.attribute "$OUT/$name" --by "$by"
  done
done
# The statistics compacted to layers.parquet (a twentieth of layers.jsonl's size: the
# repository's budget; a small run of a user keeps its log), and the listing record renewed
$PY - "$OUT" <<'EOF'
import sys
from pathlib import Path
from spider.rundir import LISTING_KEY, RunDir
for path in sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "run.json").is_file()):
    run = RunDir(path)
    if run.compact_layers(min_bytes=0):
        info = run.read_run()
        info[LISTING_KEY] = run.listing_record()
        run.write_run(info)
EOF
# every registered method has its sample
$PY - "$OUT" <<'EOF'
import sys
from pathlib import Path
from spider.methods import available_methods
missing = [m for m in available_methods() if not (Path(sys.argv[1]) / m / "run.json").is_file()]
if missing:
    sys.exit(f"error: no sample run for method(s) {', '.join(missing)}; "
             "add them to scripts/make_sample_runs.sh")
EOF
if [ ${#ONLY[@]} -eq 0 ]; then
  trap - EXIT
  rm -rf "$OUT.old"
fi
du -sh "$OUT"
