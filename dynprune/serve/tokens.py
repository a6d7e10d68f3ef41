"""Token ids made as a request arrives, padded once per batch: the forward thread gets tensors.

The classify route tokenizes each text in the request handler (``FastTokenizer.__call__``, on a
private copy of the fast tokenizer's Rust backend, truncation set once), while the previous batch
is still in the model; the worker thread then only pads a batch's ids into ``input_ids`` /
``token_type_ids`` / ``attention_mask`` in one numpy pass (``FastTokenizer.pad``) before the
forward. Before, the worker ran the HF tokenizer's batch call itself (tokenize, truncate, pad,
tensors): ~2.2 ms for 16 reviews in a quiet process and ~6 ms in a loaded server, where its
Python waited for the event loop's GIL — time in which the model did not run.

The ids, truncation and padding are those of the HF tokenizer's call (``ClassifierEngine.encode``
stays the reference): :func:`fast_tokenizer` checks that on probe texts and returns None when they
differ or the tokenizer has no Rust backend / pad token; the server then tokenizes as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

#: inputs this module builds (a tokenizer asking for others takes the HF call)
INPUTS = ("input_ids", "token_type_ids", "attention_mask")
SIDES = ("left", "right")
#: probe texts of the self-check: plain, accents / emoji / odd spacing, and one cut by truncation
PROBES = ("warm up the model", "  Héllo,   wörld! 😀 It's  a film\tabout\nnothing. ", "word " * 600)


@dataclass(frozen=True, slots=True)
class Tokens:
    """One text's token ids (special tokens added, truncated), as the HF call makes them."""

    ids: list[int]
    type_ids: list[int]

    def __len__(self) -> int:
        return len(self.ids)


class FastTokenizer:
    """Per-text tokenization on the Rust backend, and the batch padding of the HF call."""

    def __init__(self, tokenizer: Any, max_length: int, pad_multiple: int):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # private: no shared state
        backend.no_padding()
        backend.enable_truncation(max_length, direction=tokenizer.truncation_side)
        self._encode = backend.encode
        self.names = tuple(n for n in INPUTS if n in tokenizer.model_input_names)
        self.pad_id = int(tokenizer.pad_token_id)
        self.pad_type_id = int(getattr(tokenizer, "pad_token_type_id", 0) or 0)
        self.left = tokenizer.padding_side == "left"
        self.multiple = pad_multiple

    def __call__(self, text: str) -> Tokens:
        enc = self._encode(text)
        return Tokens(enc.ids, enc.type_ids)

    def pad(self, batch: Sequence[Tokens]) -> dict[str, Tensor]:
        """The batch padded to its longest text rounded up to ``pad_multiple`` tokens."""
        longest = max(len(t) for t in batch)
        width = -(-longest // self.multiple) * self.multiple
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        types = np.full((len(batch), width), self.pad_type_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, t in enumerate(batch):
            cols = slice(width - len(t), width) if self.left else slice(0, len(t))
            ids[row, cols] = t.ids
            types[row, cols] = t.type_ids
            mask[row, cols] = 1
        out = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
        return {n: torch.from_numpy(out[n]) for n in self.names}


def _same(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fast_tokenizer(
    tokenizer: Any, max_length: int, pad_multiple: int, reference: Callable[[list[str]], dict[str, Tensor]]
) -> FastTokenizer | None:
    """A FastTokenizer for ``tokenizer`` if it has a Rust backend and pads like ``reference`` (the
    HF call: texts -> padded tensors) on the probe texts, alone and together; else None."""
    names = getattr(tokenizer, "model_input_names", ())
    usable = (
        getattr(tokenizer, "is_fast", False)
        and getattr(tokenizer, "pad_token_id", None) is not None
        and getattr(tokenizer, "padding_side", None) in SIDES
        and getattr(tokenizer, "truncation_side", None) in SIDES
        and set(names) <= set(INPUTS)
        and "input_ids" in names
    )
    if not usable:
        return None
    try:
        fast = FastTokenizer(tokenizer, max_length, pad_multiple)
    except Exception:  # a backend that cannot be copied or configured: the HF call
        return None
    groups = [[p] for p in PROBES] + [list(PROBES)]
    try:
        ok = all(_same(fast.pad([fast(t) for t in group]), reference(group)) for group in groups)
    except Exception:  # the HF call refuses these settings: so does the server, as before
        return None
    return fast if ok else None
