"""Merge the points of several finished sweeps (e.g. one per seed, each with its own teacher) into
one output directory and write its sweep.csv, summary.md and pareto.png with the sweep's own code.

    python scripts/combine_sweeps.py OUT SWEEP_OUT [SWEEP_OUT ...] [--title TEXT]

The first sweep's sweep_config.yaml gives the settings (methods, statistics, indicative label);
the contender seeds become the union of the merged points' seeds. Points other than the sweep's
methods are copied to OUT/points but not tabled.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from dynprune.eval.report import machine_description
from dynprune.eval.sweep import NOTES, config_from_yaml, load_points, write_outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("sweeps", type=Path, nargs="+")
    ap.add_argument("--title", default="merged sweeps")
    ap.add_argument("--note", action="append", default=[], help="an extra line for the summary's notes")
    ap.add_argument(
        "--indicative", help="the label of comparisons without verdicts (default: the first sweep's)"
    )
    args = ap.parse_args()
    (args.out / "points").mkdir(parents=True, exist_ok=True)
    points: dict = {}
    for sweep in args.sweeps:
        for f in sorted((sweep / "points").glob("*.json")):
            shutil.copy2(f, args.out / "points" / f.name)
        points.update(load_points(sweep))
    cfg = config_from_yaml(str(args.sweeps[0] / "sweep_config.yaml"))
    seeds = sorted({int(p.get("seed", 0)) for p in points.values()})
    cfg = replace(cfg, output_dir=str(args.out), seeds=seeds, indicative=args.indicative or cfg.indicative)
    header = "\n".join(
        [
            f"# Accuracy–FLOPs sweep: {args.title}",
            "",
            f"- machine: {machine_description()}",
            "- merged from: "
            + ", ".join(f"`{s}`" for s in args.sweeps)
            + " (each one's summary.md has its settings)",
            f"- seeds: {seeds}"
            + (
                f"\n- **{cfg.indicative}**: comparisons carry no MET/MISSED verdicts"
                if cfg.indicative
                else ""
            ),
        ]
    )
    write_outputs(cfg, points, header, NOTES + args.note, title=args.title)
    (args.out / "sweep_config.yaml").write_text((args.sweeps[0] / "sweep_config.yaml").read_text())
    print(json.dumps({"points": len(points), "seeds": seeds, "out": str(args.out)}))


if __name__ == "__main__":
    main()
