#!/usr/bin/env bash
# The tuned quick checkpoints of ../tuned_quick (trained with per-FLOP ranking: run.sh there), evaluated
# with the hard selection ranking units by logit: only "unit_ranking" in the saved gates.json changes.
# From the repository root, after ../tuned_quick/run.sh (runs/tuned_quick_s$s):
#   results/smollm2_kjv/tuned_quick_logit/run.sh 0 1 2
set -euo pipefail
R=results/smollm2_kjv/tuned_quick_logit
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
for s in "${seeds[@]}"; do
  run=runs/tuned_quick_s$s
  gates=runs/tuned_quick_logit_s$s/gates
  rm -rf "$gates"; mkdir -p "$(dirname "$gates")"; cp -r $run/gated/gates "$gates"
  python - "$gates/gates.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["gate_config"]["unit_ranking"] = "logit"
json.dump(d, open(sys.argv[1], "w"), indent=2)
PY
  cp "$gates/gates.json" $R/seed$s/gates.json
  # the reference (the seed's fine-tuned dense model) and the training-free and static baselines on it
  dynprune eval perplexity --model $run/dense --method dense griffin shortgpt ln_structured \
      --budget 0.4 0.6 0.8 1.0 --chunks 8 --calibration-chunks 8 --batch-size 4 --threads 2 --out $R/seed$s/baselines
  dynprune eval perplexity --model $run/gated/base --method dense learned --gates "$gates" \
      --budget 0.4 0.6 0.8 1.0 --chunks 8 --calibration-chunks 8 --batch-size 4 --threads 2 --out $R/seed$s/learned
done
runs=(); for s in 0 1 2; do runs+=(--run seed$s=$R/seed$s/learned --reference seed$s=$R/seed$s/baselines); done
python scripts/lm_learned_summary.py "${runs[@]}" --original results/smollm2_kjv/learned_quick/seed0 \
    --reference-name "each seed's fine-tuned dense SmolLM2-135M" --out $R
