import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

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
    model = OPTForCausalLM(
        OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, ffn_dim=32, vocab_size=50,
                  word_embed_proj_dim=16, max_position_embeddings=32)
    )  # fmt: skip
    with pytest.raises(dynprune.UnsupportedModelError) as err:
        dynprune.wrap(model)
    msg = str(err.value)
    assert "'opt'" in msg
    for name in ARCH_TABLE:
        assert name in msg
    assert "ARCH_TABLE" in msg and "ArchSpec" in msg
