"""The demo's training loops on tiny models: argument checks, posterior statistics, and the flow loop's EMA ending."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from t2i_distill.conditioning import TextConditioning
from t2i_distill.demo.teacher import DEMO_TRANSFORMER, DEMO_VAE
from t2i_distill.demo.training import FlowTrainingData, latent_statistics, train_autoencoder, train_flow_teacher
from t2i_distill.models import FluxStudent


def test_autoencoder_steps_and_posterior_statistics():
    vae = AutoencoderKL(**DEMO_VAE)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    losses = train_autoencoder(vae, images, steps=2, batch_size=2, lr=1e-3, kl_weight=1e-4,
                               generator=torch.Generator().manual_seed(0), log_every=0)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    mean, std = latent_statistics(vae, images, batch_size=3)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(std, posterior.std)
    assert mean.shape == (4, 16, 8, 8)
    with pytest.raises(ValueError, match="steps"):
        train_autoencoder(vae, images, steps=0, batch_size=2, lr=1e-3, kl_weight=0.0,
                          generator=torch.Generator())


def test_flow_teacher_ends_on_its_ema_weights():
    torch.manual_seed(0)
    model = FluxStudent(**DEMO_TRANSFORMER)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = TextConditioning(torch.randn(3, 16, 32), torch.randn(3, 32))
    data = FlowTrainingData(torch.randn(2, 16, 8, 8), torch.full((2, 16, 8, 8), 0.1), torch.tensor([0, 1]), text,
                            0.1, 1.5)
    losses = train_flow_teacher(model, data, steps=1, batch_size=2, lr=1e-3, ema_decay=0.995, prompt_dropout=0.5,
                                guidance_range=(1.0, 6.0), generator=torch.Generator().manual_seed(0), log_every=0)
    assert len(losses) == 1 and not model.training
    # The model ends on the EMA copy (warm-up decay 1/10 after one step: 0.1·init + 0.9·stepped), so it moved.
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert moved
    with pytest.raises(ValueError, match="batch_size"):
        train_flow_teacher(model, data, steps=1, batch_size=0, lr=1e-3, ema_decay=0.9, prompt_dropout=0.0,
                           guidance_range=(1.0, 6.0), generator=torch.Generator())
