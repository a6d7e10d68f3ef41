import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import dynprune
from dynprune.arch import ARCH_TABLE, resolve
from tests.helpers import ENCODER_TYPES, tiny_model


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_resolve_finds_every_part(model_type):
    model = tiny_model(model_type, layers=3, heads=4, hidden=64, ffn=128)
    parts = resolve(model)
    assert parts.n_layers == 3 and parts.n_heads == 4 and parts.head_dim == 16 and parts.ffn_dim == 128
    for lp in parts.parts:
        assert lp.q.out_features == 64 and lp.o.in_features == 64
        assert lp.up.out_features == 128 and lp.down.in_features == 128
        assert isinstance(lp.attn_norm, torch.nn.LayerNorm) and isinstance(lp.ffn_norm, torch.nn.LayerNorm)
        assert callable(lp.act)


def test_unknown_model_type_error_names_supported_types_and_how_to_add():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))
    with pytest.raises(dynprune.UnsupportedModelError) as err:
        dynprune.wrap(model)
    msg = str(err.value)
    assert "gpt2" in msg
    for name in ARCH_TABLE:
        assert name in msg
    assert "ARCH_TABLE" in msg and "ArchSpec" in msg
