"""Prepacked bf16 linears (hardware.prepack_linear): the plain layer's bits for up to 32 rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from specsweep.backends.hardware import resolve
from specsweep.backends.prepack import check_supported, prepack_linears
from specsweep.errors import SpecsweepError
from tests.conftest import bf16_unsupported, tiny_llama

pytestmark = pytest.mark.skipif(bool(bf16_unsupported()), reason=bf16_unsupported() or "")


def test_packed_linear_has_the_plain_bits_for_decode_and_verify_sizes():
    torch.manual_seed(0)
    plain = nn.Linear(96, 160, bias=False).to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    assert prepack_linears(packed) == 1 and packed.weight is None
    x = torch.randn(1, 32, 96, dtype=torch.bfloat16)
    for rows in (1, 2, 5, 17, 32):
        assert torch.equal(packed(x[:, :rows]), plain(x[:, :rows]))
    assert torch.equal(packed(x[0, :3]), plain(x[0, :3]))  # 2-D input too
    assert torch.equal(packed(x[:, ::2]), plain(x[:, ::2]))  # and a strided one
    with_bias = nn.Linear(96, 160).to(torch.bfloat16)
    assert prepack_linears(with_bias) == 0  # oneDNN would round after the bias, torch before


def test_prepacked_model_gives_the_same_logits_and_drops_the_plain_weights():
    model = tiny_llama(3, layers=2).to(torch.bfloat16).eval()
    packed = copy.deepcopy(model)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(packed) == linears
    assert prepack_linears(packed) == 0  # idempotent
    ids = torch.randint(96, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(packed(ids).logits, model(ids).logits)
    plain_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in packed.parameters()) < plain_params


def test_prepack_is_refused_where_it_does_not_apply():
    with pytest.raises(SpecsweepError, match="bfloat16 on the CPU"):
        check_supported(torch.device("cpu"), torch.float32)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "x", "device": "cpu", "dtype": "float32", "attn_implementation": "sdpa",
                            "prepack_linear": True})
    with pytest.raises(SpecsweepError, match="prepack_linear"):
        resolve(cfg)
