#!/usr/bin/env bash
# The tuned quick recipe, seeds given as arguments (default 0 1 2), one after the other; every
# step resumes (dynprune train --resume, eval perplexity's rows.jsonl). From the repository root:
#   nice -n 5 results/smollm2_kjv/tuned_quick/run.sh 0 1 2
set -euo pipefail
R=results/smollm2_kjv/tuned_quick
EVAL=(--budget 0.4 0.6 0.8 1.0 --chunks 8 --calibration-chunks 8 --batch-size 4 --threads 2)
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
for s in "${seeds[@]}"; do
  run=runs/tuned_quick_s$s
  t0=$(date +%s)
  resume=(); [ -f "$run/config.yaml" ] && resume=(--resume)
  dynprune train --config configs/smollm2_kjv_tuned_quick.yaml --seed=$s --output_dir $run "${resume[@]}"
  t1=$(date +%s)
  # the fine-tuned dense reference, and the training-free router on it
  dynprune eval perplexity --model $run/dense --method dense griffin "${EVAL[@]}" --out $R/seed$s/dense_ft
  # the learned router on its tuned base (dense row: the tuned base at budget 1.0)
  dynprune eval perplexity --model $run/gated/base --method dense learned --gates $run/gated/gates \
      "${EVAL[@]}" --out $R/seed$s/learned
  t2=$(date +%s)
  mkdir -p $R/seed$s
  cp $run/config.yaml $R/seed$s/train_config.yaml
  cp $run/logs/metrics.jsonl $R/seed$s/train_log.jsonl
  python - "$run" "$R/seed$s/train_metrics.json" <<'PY'
import json, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
m = {s: json.loads((run / s / "metrics.json").read_text()) for s in ("dense", "gated")}
for v in m.values():
    v["train"].pop("history", None)
out.write_text(json.dumps(m, indent=1) + "\n")
PY
  echo "seed $s: wall train $((t1 - t0)) s, eval $((t2 - t1)) s" | tee -a $R/wall_seconds.txt
done
