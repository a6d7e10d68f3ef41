"""Export HF models to ONNX and load them into ONNX Runtime sessions (optional extra ``dynprune[onnx]``).

- :func:`export_onnx`: ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``,
  opset 17) with dynamic batch and sequence axes; inputs ``input_ids`` and
  ``attention_mask``, output ``logits``. Works for the dense model and for the
  physically pruned models of :mod:`dynprune.eval.physical`.
- :func:`ort_session`: a session at ONNX Runtime's defaults (its own intra-op
  pool of ``threads`` threads, spinning on unless ``spinning=False``), with a
  clear error when the file does not load.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path
from typing import Any

import torch

ONNX_EXTRA = "pip install 'dynprune[onnx]'"


def require_ort() -> None:
    """Raise a clear error (naming the extra) when onnxruntime / onnx are not installed."""
    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"the ONNX Runtime engine needs {', '.join(missing)}: {ONNX_EXTRA}")


def export_onnx(model: torch.nn.Module, seq: int = 16, path: Path | None = None) -> bytes:
    """ONNX bytes of a sequence-classification model (also written to ``path`` when given)."""
    ids = torch.full((2, seq), 1, dtype=torch.long)  # any valid token id (tiny test vocabularies too)
    mask = torch.ones(2, seq, dtype=torch.long)
    buf = io.BytesIO()
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (ids, mask), buf, input_names=["input_ids", "attention_mask"],
            output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=17,
            dynamo=False,
        )  # fmt: skip
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def ort_session(model: bytes | Path, threads: int, spinning: bool = True) -> Any:
    """An ONNX Runtime CPU session at its defaults (intra-op threads = ``threads``)."""
    require_ort()
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise FileNotFoundError(f"ONNX file not found: {model}")
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        where = "the exported model" if isinstance(model, bytes) else str(model)
        raise ValueError(f"ONNX Runtime cannot load {where}: {err}") from err


def ort_runner(session: Any, inputs: dict[str, torch.Tensor]) -> Any:
    """A no-argument callable running ``session`` on ``inputs`` (converted to numpy once)."""
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in inputs.items() if k in names}
    missing = names - set(feed)
    if missing:
        raise ValueError(f"the ONNX model needs inputs {sorted(missing)} the benchmark does not provide")
    return lambda: session.run(None, feed)


def ort_latency_ms(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    threads: int = 2,
    repeats: int = 9,
    block: int = 3,
) -> float:
    """Median latency (ms) of ``model`` exported to ONNX Runtime at its defaults, on ``inputs``.

    For the sweep's ``latency_ms_bs1_ort``-style columns: each round is a block
    of ``block`` calls after a pause (ORT's spinning threads settle first), as in
    ``dynprune bench cpu``. When comparing several models, prefer timing them
    together with :func:`dynprune.eval.timing.time_blocks` (interleaved rounds).
    """
    from dynprune.eval.timing import time_blocks

    run = ort_runner(ort_session(export_onnx(model), threads), inputs)
    return time_blocks({"ort": run}, warmup=1, repeats=repeats, block=block)["ort"].median_ms
