#!/usr/bin/env bash
# A 3x longer gated stage (180 steps instead of 60, logit ranking) from each seed's 60-step
# fine-tuned dense model of ../../tuned_quick, then the same evaluation; the baselines and the
# reference are ../seed*/baselines. From the repository root, after ../../tuned_quick/run.sh:
#   results/smollm2_kjv/tuned_quick_logit/gated180/run.sh 0 1 2
set -euo pipefail
R=results/smollm2_kjv/tuned_quick_logit
G=$R/gated180
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
for s in "${seeds[@]}"; do
  out=runs/tuned_quick_gated180_s$s
  resume=(); [ -f "$out/config.yaml" ] && resume=(--resume)
  dynprune train --config configs/smollm2_kjv_tuned_quick.yaml --seed=$s --output_dir $out \
      --stages='[gated]' --model.path=runs/tuned_quick_s$s/dense --optim.max_steps=180 "${resume[@]}"
  dynprune eval perplexity --model $out/gated/base --method dense learned --gates $out/gated/gates \
      --budget 0.4 0.6 0.8 1.0 --chunks 8 --calibration-chunks 8 --batch-size 4 --threads 2 --out $G/seed$s/learned
  cp $out/logs/metrics.jsonl $G/seed$s/train_log.jsonl
done
runs=(); for s in 0 1 2; do runs+=(--run seed$s=$G/seed$s/learned --reference seed$s=$R/seed$s/baselines); done
python scripts/lm_learned_summary.py "${runs[@]}" --original results/smollm2_kjv/learned_quick/seed0 \
    --reference-name "each seed's fine-tuned dense SmolLM2-135M (60 steps)" --out $G
