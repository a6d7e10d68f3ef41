"""The model behind the server: load it (safetensors; ``--model`` also GGUF), warm it, run one
batched forward. Causal LMs get the generation engine of ``generator.py``.

``ClassifierEngine.classify`` is the only code that touches the model; the batcher
calls it from its single worker thread with the texts of several requests, each at
its own budget (one (B,) budget tensor: per-sample masks in ONE forward). The route
hands it ``prepare(text)`` of each text, made when the request arrived: token ids
(``tokens.py``: the worker only pads them), or the text itself when the tokenizer
has no fast path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import dynprune
from dynprune.config import GateConfig
from dynprune.model import GatedModel

from .config import ServeConfig
from .tokens import Tokens, fast_tokenizer

PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


class StartupError(RuntimeError):
    """The server cannot start with what it was given (the message says why and what to do)."""


@dataclass(frozen=True)
class ClassifyResult:
    label_id: int
    scores: tuple[float, ...]
    flops_ratio: float
    tokens: int
    padded_len: int
    truncated: bool
    batch_size: int


def _check_safetensors_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise StartupError(f"{what} {path} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise StartupError(
            f"{what} {path} has no config.json (expected a Hugging Face save_pretrained directory)"
        )
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return
    pickled = [p for p in PICKLED if (path / p).exists()]
    if pickled:
        raise StartupError(
            f"{what} {path} holds only pickled weights ({', '.join(pickled)}); dynprune serve loads only "
            "safetensors (pickle can run code). Convert with model.save_pretrained(dir, safe_serialization=True)."
        )
    raise StartupError(f"{what} {path} has no model.safetensors")


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def task_of(model: torch.nn.Module, where: Path) -> str:
    """ "classification" or "generation" for a model the server can serve; else StartupError."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith(CAUSAL_SUFFIXES):
        return "generation"
    raise StartupError(
        f"{where} is a {name}; dynprune serve serves sequence-classification models "
        "(…ForSequenceClassification) and causal LMs (…ForCausalLM, GPT2LMHeadModel)"
    )


def _is_causal_dir(path: Path) -> bool:
    import transformers

    archs = getattr(transformers.AutoConfig.from_pretrained(path), "architectures", None) or []
    return any(a.endswith(CAUSAL_SUFFIXES) for a in archs)


def _load_plain(path: Path):
    """(HF model, tokenizer) of ``--model PATH``: a save_pretrained directory (safetensors) or a
    GGUF file (llama.cpp's format: tensors and metadata, no code; dequantised by transformers)."""
    import transformers

    if path.is_file() and path.suffix == ".gguf":
        try:
            kw = {"gguf_file": path.name}
            hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
            return hf, transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
        except Exception as err:
            raise StartupError(
                f"GGUF model {path} could not be loaded ({type(err).__name__}: {err})"
            ) from err
    _check_safetensors_dir(path, "model")
    try:
        auto = (
            transformers.AutoModelForCausalLM
            if _is_causal_dir(path)
            else transformers.AutoModelForSequenceClassification
        )
        hf = auto.from_pretrained(path, use_safetensors=True)
        return hf, transformers.AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise StartupError(f"model {path} could not be loaded ({type(err).__name__}: {err})") from err


def _own_memory(model: torch.nn.Module) -> None:
    """Copy weights out of the memory-mapped safetensors file (pages could be evicted under load)."""
    for p in model.parameters():
        p.data = p.data.clone()


def load_engine(cfg: ServeConfig, checkpoint: str | None = None, model: str | None = None, seed: int = 0):
    """Load a gated checkpoint (``dynprune train`` / ``save_gated_model``) or wrap a plain HF
    classification model or causal LM with open gates; raise :class:`StartupError` with the reason.
    A causal LM gets a :class:`~dynprune.serve.generator.GeneratorEngine`."""
    if (checkpoint is None) == (model is None):
        raise StartupError("give exactly one of --checkpoint DIR or --model PATH")

    torch.manual_seed(seed)  # --model: the new classifier head / untrained router are seeded
    if checkpoint is not None:
        root = Path(checkpoint)
        if not root.is_dir():
            raise StartupError(f"checkpoint {root} does not exist or is not a directory")
        if (root / "config.json").is_file() and not (root / dynprune.io.BASE_DIR).is_dir():
            raise StartupError(
                f"{root} is a plain Hugging Face model directory, not a gated checkpoint "
                "(base/ + gates/); serve it with --model"
            )
        _check_safetensors_dir(root / dynprune.io.BASE_DIR, "checkpoint base model")
        gates = root / dynprune.io.GATES_DIR
        if not (gates / dynprune.io.GATES_WEIGHTS).is_file():
            raise StartupError(f"checkpoint {root} has no {gates}/{dynprune.io.GATES_WEIGHTS} (saved gates)")
        try:
            gated, tokenizer = dynprune.load_gated_model(root)
        except dynprune.IncompatibleGatesError as err:
            raise StartupError(f"checkpoint {root} does not fit together: {err}") from err
        except Exception as err:  # corrupt files: safetensors / json / HF errors
            raise StartupError(
                f"checkpoint {root} could not be loaded ({type(err).__name__}: {err})"
            ) from err
        source = str(root)
        if tokenizer is None:
            raise StartupError(f"checkpoint {root} has no tokenizer in {root / dynprune.io.BASE_DIR}")
    else:
        path = Path(model)
        hf, tokenizer = _load_plain(path)
        task_of(hf, path)
        try:
            # open gates serve budget 1.0; the slice size only has to divide the FFN width
            ffn = dynprune.arch.resolve(hf).ffn_dim
            slice_size = next(s for s in range(min(GateConfig().ffn_slice_size, ffn), 0, -1) if ffn % s == 0)
            gated = dynprune.wrap(hf.eval(), GateConfig(ffn_slice_size=slice_size))
        except (dynprune.UnsupportedModelError, ValueError) as err:
            raise StartupError(f"model {path} cannot be gated: {err}") from err
        source = str(path)
    task = task_of(gated.model, Path(source))
    _own_memory(gated)
    if task == "generation":
        from .generator import GeneratorEngine

        engine = GeneratorEngine(gated.eval(), tokenizer, cfg, source)
    else:
        engine = ClassifierEngine(gated.eval(), tokenizer, cfg, source)
    engine.trained_router = checkpoint is not None
    engine.warm_up()
    return engine


class ClassifierEngine:
    task = "classification"
    trained_router = True  # False: --model, a plain model wrapped with an untrained router

    def __init__(self, gated: GatedModel, tokenizer: Any, cfg: ServeConfig, source: str):
        self.gated, self.tokenizer, self.cfg, self.source = gated, tokenizer, cfg, source
        limit = getattr(gated.model.config, "max_position_embeddings", None)
        if limit is not None and cfg.max_length > limit:
            raise StartupError(f"--max-length {cfg.max_length} exceeds the model's {limit} positions")
        id2label = getattr(gated.model.config, "id2label", None) or {}
        n = int(gated.model.config.num_labels)
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
        fm = gated.flops
        # the smallest budget the router can honour: fixed costs over dense, largest at the
        # shortest sequence (CLS + SEP = 2 tokens); padding only lowers it
        self.min_budget = math.ceil(fm.fixed(2) / fm.dense(2) * 1e4) / 1e4
        self.fast = fast_tokenizer(tokenizer, cfg.max_length, cfg.pad_multiple, self.encode)

    @property
    def model_name(self) -> str:
        return type(self.gated.model).__name__

    def warm_up(self) -> None:
        """Run the code paths once (dense and gated, batch 1 and a full batch) before /health is ready."""
        text = "warm up the model"
        for n in {1, self.cfg.max_batch}:
            self.classify([text] * n, [1.0] * n)
            self.classify([text] * n, [max(0.5, self.min_budget)] * n)

    def encode(self, texts: list[str], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize (truncated to ``max_length``), pad to the batch's longest text rounded up to
        ``pad_multiple`` tokens, or to exactly ``pad_to`` tokens."""
        cut = {"truncation": True, "max_length": self.cfg.max_length}
        if pad_to is None:
            multiple = self.cfg.pad_multiple
            padded = self.tokenizer(
                texts, **cut, padding=True, pad_to_multiple_of=multiple, return_tensors="pt"
            )
        else:
            enc = self.tokenizer(texts, **cut)
            padded = self.tokenizer.pad(enc, padding="max_length", max_length=pad_to, return_tensors="pt")
        return dict(padded)

    def classify_alone(self, text: str, budget: float, padded_len: int) -> ClassifyResult:
        """The unbatched reference: ``text`` alone, padded to ``padded_len`` (the length of the
        batch it was served in). Routing costs depend on the padded length, so this is the
        forward whose masks and outputs a batched answer must equal."""
        return self._run([budget], self.encode([text], pad_to=padded_len))[0]

    def prepare(self, text: str) -> Tokens | str:
        """What the route queues for ``text`` (in the request handler, before the batch forms):
        its token ids, or the text itself when the tokenizer has no fast path."""
        return text if self.fast is None else self.fast(text)

    def batch_of(self, texts: Sequence[str | Tokens]) -> dict[str, torch.Tensor]:
        """The padded batch of ``texts`` (strings, or what :meth:`prepare` made of them); the same
        tensors as :meth:`encode` (tokens.py checks it when the engine is built)."""
        if self.fast is None:
            return self.encode(list(texts))  # type: ignore[arg-type]  # prepare() kept the texts
        return self.fast.pad([t if isinstance(t, Tokens) else self.fast(t) for t in texts])

    def classify(self, texts: Sequence[str | Tokens], budgets: list[float] | Any) -> list[ClassifyResult]:
        """One forward over ``texts`` (strings, or what :meth:`prepare` made of them): text i at
        ``budgets[i]`` (validated by the caller), or every text under one budget object of the
        library (mean-budget mode)."""
        return self._run(budgets, self.batch_of(texts))

    def _run(self, budgets: list[float] | Any, batch: dict[str, torch.Tensor]) -> list[ClassifyResult]:
        tokens = batch["attention_mask"].sum(1).tolist()
        budget = torch.tensor(budgets, dtype=torch.float64) if isinstance(budgets, list) else budgets
        with torch.inference_mode():
            logits = self.gated(**batch, budget=budget).logits
            info = self.gated.last
        scores = torch.softmax(logits.float(), dim=-1).tolist()
        ratio = info.flops_ratio.tolist() if info is not None else [1.0] * len(tokens)
        padded, size = int(batch["input_ids"].shape[1]), len(tokens)
        return [
            ClassifyResult(
                label_id=max(range(len(s)), key=s.__getitem__),
                scores=tuple(s),
                flops_ratio=float(r),
                tokens=int(t),
                padded_len=padded,
                truncated=int(t) >= self.cfg.max_length,
                batch_size=size,
            )
            for s, r, t in zip(scores, ratio, tokens)
        ]
