"""``GatedModel.generate``: HF generation through the gated forward, with its inputs checked first.

HF's ``generate`` calls the model's ``forward`` once per step. Here it runs on
the inner HF model whose ``forward`` is, for the duration of the call, the gated
forward (``GatedModel._gated_call`` with the generation's budget): the prefill
routes each prompt (its own gates, per-sample budgets) and stores the decision
in the :class:`~dynprune.kv_cache.GatedKVCache`; every later step reuses it
(docs/architecture.md, "KV cache"). At budget 1.0 without masks the HF
generate runs untouched (token-for-token the unwrapped model's output).

Refused with a clear error before anything is generated: an empty prompt, a
prompt or prompt + ``max_new_tokens`` beyond the model's context,
``max_new_tokens`` ≤ 0, beam search / assisted decoding (the block cache
cannot be re-indexed), a cache that is not a GatedKVCache, budgets out of
(0, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.utils import GenerationMixin

if TYPE_CHECKING:
    from dynprune.model import GatedModel

Tensor = torch.Tensor
ForwardLike = Callable[..., Any]

#: Inner-model attributes that run the model (so would bypass the gates): never passed through.
_FORWARD_LIKE = frozenset(
    {"forward", "__call__", "_call_impl", "_wrapped_call_impl"}
    | {
        n
        for n in dir(GenerationMixin)
        if callable(getattr(GenerationMixin, n, None)) and not n.startswith("__")
    }
)
_UNSUPPORTED_GENERATION = {
    "assistant_model": "assisted decoding",
    "penalty_alpha": "contrastive search",
    "prompt_lookup_num_tokens": "prompt-lookup decoding",
}


def reject_forward_like(name: str) -> None:
    """Raise AttributeError for an inner-model method that would run the model without gates."""
    if name in _FORWARD_LIKE:
        raise AttributeError(
            f"GatedModel does not pass {name!r} through to the inner HF model: it would run without gates "
            f"(use the GatedModel itself, e.g. gated(...) / gated.generate(...), or gated.model.{name} for the "
            "ungated model on purpose)"
        )


def _context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def _check_request(gm: GatedModel, input_ids: Tensor, kwargs: dict) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, prompt length), got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError("empty prompt: generate needs at least one prompt token per sequence")
    mask = kwargs.get("attention_mask")
    if mask is not None and bool((mask.sum(-1) == 0).any()):
        raise ValueError("empty prompt: a sequence's attention_mask has no token")
    gen_cfg = kwargs.get("generation_config") or gm.model.generation_config
    max_new = kwargs.get("max_new_tokens", getattr(gen_cfg, "max_new_tokens", None))
    prompt = int(input_ids.shape[1])
    context = _context_length(gm.model.config)
    if context is not None and prompt > context:
        raise ValueError(f"prompt of {prompt} tokens is longer than the model's context ({context} tokens)")
    if max_new is not None:
        if int(max_new) <= 0:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        if context is not None and prompt + int(max_new) > context:
            raise ValueError(
                f"prompt ({prompt}) + max_new_tokens ({max_new}) exceeds the model's context ({context} tokens)"
            )
    beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1
    if int(beams) > 1:
        raise ValueError(
            "beam search (num_beams > 1) is not supported by gated generation; use greedy or sampling"
        )
    for key, what in _UNSUPPORTED_GENERATION.items():
        if kwargs.get(key) is not None or getattr(gen_cfg, key, None) not in (None, 0):
            raise ValueError(f"{what} ({key}) is not supported by gated generation")


def gated_generate(gm: GatedModel, args: tuple, kwargs: dict, budget: float | Tensor | None) -> Tensor:
    """GatedModel.generate (see module docstring)."""
    from dynprune.budget import normalize_budget
    from dynprune.kv_cache import GatedKVCache

    if not gm.parts.spec.causal:
        raise ValueError(f"{gm.parts.spec.family} is not a causal LM: it cannot generate")
    input_ids = args[0] if args else kwargs.get("input_ids")
    if not isinstance(input_ids, Tensor):
        raise ValueError("GatedModel.generate needs input_ids (batch, prompt length) as a tensor")
    masks = kwargs.pop("masks", None)
    _check_request(gm, input_ids, kwargs)
    budgets = normalize_budget(
        gm.gate_config.default_budget if budget is None else budget, input_ids.shape[0], input_ids.device
    )
    cache = kwargs.pop("cache", None)
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    dense = masks is None and bool((budgets >= 1.0).all())
    if dense and not isinstance(cache, GatedKVCache):  # the HF generate, untouched
        if cache is not None:
            kwargs["cache"] = cache
        return gm.model.generate(*args, **kwargs)
    if cache is None:
        cache = gm.new_cache()
    elif not isinstance(cache, GatedKVCache) or cache.get_seq_length() or cache.decision is not None:
        raise ValueError(
            f"gated generation needs a fresh dynprune.GatedKVCache (or none), got {type(cache).__name__}"
            + (" that already holds tokens" if isinstance(cache, GatedKVCache) else "")
        )
    if not gm._use_gathered():
        raise ValueError(
            "gated generation runs on the gathered path: call gated.eval() first (or use "
            "GateConfig(execution='gathered')); the masked training path has no gated KV cache"
        )
    if kwargs.get("use_cache") is False:
        raise ValueError("gated generation always uses its KV cache; drop use_cache=False")
    inner = gm.model
    original = type(inner).forward.__get__(inner)

    @functools.wraps(original)  # HF inspects the signature (logits_to_keep, cache arguments)
    def gated_forward(*f_args: Any, **f_kwargs: Any) -> Any:
        return gm._gated_call(original, f_args, f_kwargs, budgets, masks)

    inner.forward = gated_forward  # instance attribute: nn.Module.__call__ now runs the gated forward
    try:
        return inner.generate(*args, cache=cache, **kwargs)
    finally:
        del inner.forward
