"""Models, inputs and helper callables for `dynprune bench cpu` (eval/bench_cpu.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dynprune.eval.physical import physically_prune, units_of_sample
from dynprune.eval.timing import materialize


@dataclass
class BenchModels:
    name: str
    dense: torch.nn.Module  # unwrapped, original unit order
    gated: Any  # GatedModel (eval mode)
    tokenizer: Any | None
    router_note: str
    text_inputs: bool

    def router_input(self, inputs: dict[str, torch.Tensor], budget: float = 0.5) -> torch.Tensor:
        """The hidden states the router reads for ``inputs``, from a forward on the PyTorch path
        (``gated.last`` is that forward's)."""
        from dynprune.exec import reference_path
        from dynprune.state import GateState

        gated = self.gated
        captured: dict[str, Any] = {}
        original = gated._route

        def capture(hidden: torch.Tensor, state: GateState) -> Any:
            captured["hidden"] = hidden
            return original(hidden, state)

        gated._route = capture
        try:  # on the PyTorch path: the whole-forward graph (batch 1) routes inside ONNX Runtime
            with torch.inference_mode(), reference_path(gated):
                gated(**inputs, budget=budget)
        finally:
            del gated._route
        return captured["hidden"]

    def route_and_plan_fns(self, inputs: dict[str, torch.Tensor], budget: float) -> tuple[Callable, Callable]:
        """Callables running (router + gate selection) and (planning) exactly as a PyTorch-path
        forward does."""
        from dynprune.budget import normalize_budget
        from dynprune.plan import plan_forward
        from dynprune.state import GateState

        gated = self.gated
        hidden = self.router_input(inputs, budget)
        ids = inputs["input_ids"]
        budgets = normalize_budget(budget, ids.shape[0], ids.device)
        state = GateState()
        state.begin(budgets, inputs.get("attention_mask"), None, gathered=True, backend="torch")
        masks = gated.last.masks.canonical()

        def route() -> Any:
            return gated._route(hidden, state)

        def plan() -> Any:
            return plan_forward(masks.head, masks.ffn, masks.layer)

        return route, plan


def _model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification") and hasattr(transformers, arch):
            return getattr(transformers, arch)
    return transformers.AutoModelForSequenceClassification


def _tokenizer_or_none(path: Path) -> Any | None:
    """The model dir's own tokenizer, or None for a bare model dir (no tokenizer files)."""
    import transformers

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def diversify_router(gated: Any, seed: int, scale: float) -> None:
    """Re-initialise the router's output layer with larger seeded random weights (masks differ per sample)."""
    out = gated.router.out
    if out is None:
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out.weight.copy_(torch.randn(out.weight.shape, generator=g) * scale)
        out.bias.copy_(torch.randn(out.bias.shape, generator=g) * scale)


def load_models(args: Any) -> BenchModels:
    import transformers

    import dynprune

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.checkpoint is not None:
        gated, tokenizer = dynprune.load_gated_model(args.checkpoint)
        base = Path(args.checkpoint) / "base"
        cls = _model_class(transformers.AutoConfig.from_pretrained(base))
        dense = cls.from_pretrained(base).eval()
        name = f"{Path(args.checkpoint).name} (checkpoint)"
        note = "trained gates from the checkpoint"
    else:
        from dynprune.assets import minilm_path

        path = Path(args.model) if args.model is not None else minilm_path()
        config = transformers.AutoConfig.from_pretrained(path)
        cls = _model_class(config)
        torch.manual_seed(args.seed)  # the new classification head
        dense = cls.from_pretrained(path, num_labels=2).eval()
        torch.manual_seed(args.seed)
        model = cls.from_pretrained(path, num_labels=2).eval()
        # ranked per FLOP: with random output weights, ranking by logit follows the weights more
        # than the input and gives one mask for every sample (the speed is what is measured here)
        gated = dynprune.wrap(model, dynprune.GateConfig(unit_ranking="per_flop"))
        diversify_router(gated, args.seed, args.router_scale)
        tokenizer = _tokenizer_or_none(path)
        name = "MiniLM" if args.model is None else path.name
        note = (
            "untrained router, output layer re-initialised with seeded random weights "
            f"(std {args.router_scale}, seed {args.seed}) and units ranked per FLOP so masks differ per sample"
        )
    materialize(dense)
    materialize(gated)
    gated.eval()
    text = tokenizer is not None and args.inputs != "random"
    if args.inputs == "text" and tokenizer is None:
        raise SystemExit("dynprune bench cpu: --inputs text needs a tokenizer in the model dir")
    return BenchModels(name, dense, gated, tokenizer, note, text)


_TEXT_CACHE: dict[int, list[int]] = {}


def _text_tokens(tokenizer: Any, n_tokens: int) -> list[int]:
    """Token ids of consecutive Rotten Tomatoes test reviews, at least ``n_tokens`` of them."""
    key = id(tokenizer)
    if key not in _TEXT_CACHE or len(_TEXT_CACHE[key]) < n_tokens:
        from dynprune.assets import rotten_tomatoes_split

        ids: list[int] = []
        for text, _ in rotten_tomatoes_split()["test"]:
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= n_tokens:
                break
        _TEXT_CACHE[key] = ids
    return _TEXT_CACHE[key]


def make_inputs(bm: BenchModels, batch: int, seq: int, shared: bool, seed: int) -> dict[str, torch.Tensor]:
    """(batch, seq) inputs without padding; ``shared``: every row is the same input."""
    rows = 1 if shared else batch
    if bm.text_inputs:
        tok = bm.tokenizer
        body = seq - 2
        pool = _text_tokens(tok, rows * body * 2 + seed * body)
        ids = []
        for r in range(rows):
            start = (seed + r) * body
            ids.append([tok.cls_token_id, *pool[start : start + body], tok.sep_token_id])
        input_ids = torch.tensor(ids, dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(seed)
        vocab = int(bm.dense.config.vocab_size)
        input_ids = torch.randint(min(1000, vocab // 2), vocab, (rows, seq), generator=g)
    if shared:
        input_ids = input_ids.expand(batch, seq).contiguous()
    return {"input_ids": input_ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def prepare_limit(
    bm: BenchModels, masks: Any, flops: torch.Tensor, seq: int
) -> tuple[torch.nn.Module, float]:
    """Physically sliced dense model of the sample whose FLOPs are closest to the batch mean.

    Returns (model, its FLOPs per sample by the FLOPs module).
    """
    row = int((flops - flops.mean()).abs().argmin())
    heads, neurons, layers = units_of_sample(bm.gated, masks, row)
    limit = materialize(physically_prune(bm.dense, heads, neurons, layers))
    return limit.eval(), float(flops[row])
