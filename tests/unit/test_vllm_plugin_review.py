"""Serving review, the parts that need no engine: strict ``bind`` checks every saved name of a tied
parameter, and the vLLM layout refuses sizes that are not positive, naming the config.json key."""

from __future__ import annotations

import pytest
import torch

from hotweights.errors import BindError, InvalidArgument
from hotweights.format.engine_layout import Shape
from hotweights.torch import bind

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_size": 128,
    "intermediate_size": 256,
    "vocab_size": 500,
}


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_strict_bind_checks_the_second_name_of_a_tied_parameter():
    """Finding 12: the attachment holds ``head.weight`` mis-shaped and mis-typed beside a good
    ``embed.weight``; strict bind names it instead of passing over it."""
    good = torch.zeros(10, 4)
    with pytest.raises(BindError) as caught:
        bind(Tied(), {"embed.weight": good, "head.weight": torch.zeros(7, 3, dtype=torch.float16)})
    assert "head.weight: attached (7, 3), module wants (10, 4)" in str(caught.value)
    with pytest.raises(BindError) as caught:
        bind(Tied(), {"embed.weight": good, "head.weight": torch.zeros(10, 4, dtype=torch.float16)})
    assert "head.weight: attached torch.float16, module wants torch.float32" in str(caught.value)
    model = Tied()
    rep = bind(model, {"embed.weight": good, "head.weight": good.clone()})
    assert rep.tied == {"head.weight": "embed.weight"} and rep.unused == []
    assert model.head.weight is model.embed.weight


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_attention_heads", 0),
        ("num_attention_heads", -4),
        ("num_key_value_heads", -2),
        ("head_dim", -32),
        ("hidden_size", -128),
        ("intermediate_size", 0),
        ("vocab_size", 0),
    ],
)
def test_a_size_that_is_not_positive_is_refused_naming_the_key(key, value):
    """Finding 6: ``num_attention_heads: 0`` with an explicit head_dim was a ZeroDivisionError; negative
    sizes passed on to odd row counts."""
    with pytest.raises(InvalidArgument) as caught:
        Shape({**LLAMA, key: value}, 1)
    assert f"{key} is {value}" in str(caught.value), caught.value


def test_a_negative_expert_count_is_refused():
    with pytest.raises(InvalidArgument, match="num_local_experts is -4"):
        Shape({**LLAMA, "architectures": ["MixtralForCausalLM"], "num_local_experts": -4}, 1)
    assert Shape({**LLAMA, "num_local_experts": 0}, 1).experts == 0
