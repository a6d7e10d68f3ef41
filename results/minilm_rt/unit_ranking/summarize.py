"""Per-FLOP vs logit ranking of the same static-control checkpoints (this folder's eval JSONs):
accuracy per seed, paired difference, mean ± std and a 95 % t-interval over seeds.
    python results/minilm_rt/unit_ranking/summarize.py"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
T_975_DF2 = 4.302653  # Student t, 97.5 % quantile, 2 degrees of freedom (3 seeds)


def accuracy(kind: str, seed: int) -> dict[float, tuple[float, float]]:
    rows = json.loads((HERE / f"{kind}_seed{seed}.json").read_text())["rows"]
    return {r["budget"]: (100 * r["accuracy"], r["flops_ratio_mean"]) for r in rows if r["budget"] < 1}


for budget in (0.5, 0.25):
    per_flop = [accuracy("per_flop", s)[budget] for s in range(3)]
    logit = [accuracy("logit", s)[budget] for s in range(3)]
    diff = [a[0] - b[0] for a, b in zip(logit, per_flop)]
    mean, sd = statistics.mean(diff), statistics.stdev(diff)
    half = T_975_DF2 * sd / len(diff) ** 0.5
    print(
        f"budget {budget}: per_flop {' / '.join(f'{a:.2f}' for a, _ in per_flop)} %, "
        f"logit {' / '.join(f'{a:.2f}' for a, _ in logit)} % (FLOPs {' / '.join(f'{f:.3f}' for _, f in logit)}); "
        f"logit - per_flop {mean:+.2f} ± {sd:.2f} pt, 95 % t-interval [{mean - half:+.2f}, {mean + half:+.2f}]"
    )
