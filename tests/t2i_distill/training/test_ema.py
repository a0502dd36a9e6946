"""EMA: the moving-average formula step by step, fp32 shadow, copy/swap, state round trip, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from t2i_distill.training import EMA


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    model[1].weight.requires_grad_(False)  # frozen parameters are not averaged
    return model


def test_update_follows_the_formula_for_several_steps():
    model = _model()
    ema = EMA(model, decay=0.9)
    expected = {name: p.detach().double().clone() for name, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for name, p in model.named_parameters():
            if name in expected:
                expected[name] = 0.9 * expected[name] + 0.1 * p.detach().double()
    assert ema.num_updates == 3 and set(ema.shadow) == {"0.weight", "0.bias", "1.bias"}
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name].double(), value, rtol=0, atol=1e-6)


def test_shadow_is_fp32_for_bf16_parameters_and_copy_to_casts_back():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    initial = model.weight.detach().float().clone()
    ema = EMA(model, decay=0.5)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)
    expected = 0.5 * initial + 0.5 * 2.0  # exact in fp32 (not representable in bf16 in general)
    assert torch.equal(ema.shadow["weight"], expected)
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16 and torch.equal(model.weight, expected.to(torch.bfloat16))


def test_average_parameters_swaps_in_and_restores():
    model = _model()
    ema = EMA(model, decay=0.0)  # decay 0: the shadow becomes the latest weights
    original = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    trained = model[0].weight.detach().clone()
    with ema.average_parameters(model):
        assert torch.equal(model[0].weight, original)
    assert torch.equal(model[0].weight, trained)


def test_state_dict_round_trip_and_mismatches(tmp_path):
    model = _model()
    ema = EMA(model, decay=0.99)
    ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    other = EMA(_model(), decay=0.5)
    other.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert other.decay == 0.99 and other.num_updates == 1
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="shadow names differ"):
        EMA(nn.Linear(3, 2), decay=0.9).load_state_dict(ema.state_dict())
    wrong_shape = {**ema.state_dict(), "shadow": {**ema.state_dict()["shadow"], "0.weight": torch.ones(5, 3)}}
    with pytest.raises(ValueError, match=r"shadow shapes differ.*0.weight: \(5, 3\) vs \(2, 3\)"):
        EMA(_model(), decay=0.9).load_state_dict(wrong_shape)
    with pytest.raises(ValueError, match="trainable parameters differ"):
        ema.update(nn.Linear(3, 2))


@pytest.mark.parametrize("decay", [1.0, -0.1, True, "0.9"])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="decay: expected a float in \\[0, 1\\)"):
        EMA(nn.Linear(2, 2), decay=decay)
