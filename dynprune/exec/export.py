"""``dynprune export``: a gated checkpoint -> a directory that runs without the training stack.

The directory holds the whole gated forward as one ONNX graph (``gated.onnx`` +
``gated.onnx.data``, :mod:`dynprune.exec.whole_graph`), ``gated.json`` (the FLOPs
model as exact quadratics in the sequence length, the graph's inputs, labels) and
``run_gated.py`` (:mod:`dynprune.exec.gated_runtime`: numpy + onnxruntime), plus the
tokenizer when the checkpoint has one. After writing, it is loaded back and its
predictions are checked against the GatedModel's (batch 1, several budgets).
For a *static* freeze to a plain ONNX model see ``dynprune eval --export-frozen``.

    dynprune export --checkpoint runs/quick/static/static --out exported/
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynprune.exec import gated_runtime
from dynprune.exec.onnx_pieces import ExternalData

#: budgets the round-trip check compares at
CHECK_BUDGETS = (0.25, 0.5, 1.0)
CHECK_ATOL = 1e-4


def flops_quadratics(fm: Any) -> dict[str, list[float]]:
    """(a, b, c) with f(T) = a·T² + b·T + c for the FLOPs functions the graph's inputs need
    (exact: every one is a quadratic in T; checked at a fourth length)."""
    funcs = {"dense": fm.dense, "fixed": fm.fixed, "head_cost": fm.head_cost, "slice_cost": fm.slice_cost}
    out = {}
    for name, f in funcs.items():
        c, f1, f2 = float(f(0)), float(f(1)), float(f(2))
        a = (f2 - 2 * f1 + c) / 2
        b = f1 - c - a
        if abs(a * 49 + b * 7 + c - f(7)) > 1e-6 * max(1.0, abs(f(7))):
            raise ValueError(f"the FLOPs model's {name} is not a quadratic in the sequence length")
        out[name] = [a, b, c]
    return out


def export_gated(gated: Any, directory: str | Path, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write the exported directory (see the module docstring); atomic: a crash leaves no half-written one."""
    from dynprune.exec import FastEncoder, unsupported_reason, whole_graph_unsupported
    from dynprune.io import atomic_directory

    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty (pass --overwrite to replace it)")
    reason = unsupported_reason(gated, insist=True) or whole_graph_unsupported(gated)
    if reason is not None:
        raise ValueError(f"cannot export this gated model: {reason}")
    gated.eval()
    whole = FastEncoder(gated).whole()
    with atomic_directory(target) as tmp:
        external = ExternalData(tmp / "gated.onnx.data")
        try:
            model = whole.graph(external)
        finally:
            external.close()
        (tmp / "gated.onnx").write_bytes(model.SerializeToString())
        config = gated.model.config
        meta = {
            "format": gated_runtime.FORMAT,
            "model_type": config.model_type,
            "output": whole.output_key,
            "id2label": {str(k): v for k, v in (getattr(config, "id2label", None) or {}).items()},
            "token_inputs": list(whole.token_inputs),
            "flops": flops_quadratics(gated.flops),
            "default_budget": gated.gate_config.default_budget,
            "layers": gated.n_gated,
            "heads": gated.parts.n_heads,
            "ffn_slices": gated.n_slices,
        }
        (tmp / "gated.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.copyfile(gated_runtime.__file__, tmp / "run_gated.py")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


def check_round_trip(gated: Any, directory: str | Path, samples: list[torch.Tensor]) -> float:
    """Max |output difference| between the exported directory and ``gated`` (batch 1 each, at
    :data:`CHECK_BUDGETS`); raises if outputs or executed FLOPs disagree."""
    runtime = gated_runtime.GatedOnnx(directory)
    worst = 0.0
    for ids in samples:
        for budget in CHECK_BUDGETS:
            with torch.inference_mode():
                ref = gated(input_ids=ids[None], budget=budget)[0].numpy()
            ratio_ref = float(gated.last.flops_ratio[0])
            out, ratio = runtime(ids[None].numpy(), budget=budget)
            worst = max(worst, float(np.abs(out - ref).max()))
            if worst > CHECK_ATOL or abs(ratio[0] - ratio_ref) > 1e-9:
                raise RuntimeError(
                    f"the exported model disagrees with the checkpoint at budget {budget}: max |diff| "
                    f"{worst:.2e}, FLOPs ratio {ratio[0]:.6f} vs {ratio_ref:.6f}"
                )
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynprune export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a saved gated model (base/ + gates/)")
    parser.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    from dynprune.exec import ort_available
    from dynprune.io import load_gated_model

    if not ort_available():
        print("dynprune export: needs onnxruntime and onnx: pip install 'dynprune[onnx]'", file=sys.stderr)
        return 2
    try:
        gated, tokenizer = load_gated_model(args.checkpoint)
        out = export_gated(gated, args.out, tokenizer, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"dynprune export: {err}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    vocab = int(gated.model.config.vocab_size)
    samples = [torch.randint(min(1000, vocab // 2), vocab, (n,), generator=g) for n in (7, 23, 64)]
    worst = check_round_trip(gated, out, samples)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    print(f"exported {args.checkpoint} -> {out} ({size:.0f} MiB); round trip at budgets "
          f"{', '.join(map(str, CHECK_BUDGETS))} on {len(samples)} inputs: max |diff| {worst:.1e}, FLOPs equal")  # fmt: skip
    return 0
