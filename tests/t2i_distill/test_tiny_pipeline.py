"""The tiny offline FLUX folder: diffusers' own ``FluxPipeline.from_pretrained`` loads it and generates, the weights
follow the seed, the tokenizers know their words, the CLI writes it, and it stays a few MB."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from t2i_distill import cli
from t2i_distill.tiny_pipeline import TINY_PIPELINE_TRANSFORMER, TINY_VOCABULARY, write_tiny_flux_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE at import; set the constant too, so any hub request fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_flux_pipeline_from_pretrained_loads_the_folder_offline_and_generates(folder, offline):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    pipe = FluxPipeline.from_pretrained(folder)
    assert isinstance(pipe.transformer, FluxTransformer2DModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.use_dynamic_shifting
    assert pipe.transformer.config.guidance_embeds and pipe.transformer.config.in_channels == 64
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.1159, 0.3611)
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    image = pipe("two red circles", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                 max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_weights_follow_the_seed(folder, tmp_path):
    from safetensors.torch import load_file

    same, other = write_tiny_flux_pipeline(tmp_path / "same", seed=0), write_tiny_flux_pipeline(tmp_path / "o", seed=1)
    for sub, file in (("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder_2", "model.safetensors"),
                      ("vae", "diffusion_pytorch_model.safetensors")):
        a, b, c = (load_file(root / sub / file) for root in (folder, same, other))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tokenizers_know_every_word_and_spell_anything_else(folder):
    from transformers import CLIPTokenizer, T5Tokenizer

    clip = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    t5 = T5Tokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    for word in TINY_VOCABULARY:
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5(word, add_special_tokens=False).input_ids) == 1, word
    ids = t5("Xylophone 42!", add_special_tokens=False).input_ids
    assert t5.unk_token_id not in ids and len(ids) > 3  # character fallback, not <unk>
    assert t5.decode(ids).replace(" ", "") == "Xylophone42!"
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)  # T5's id layout


def test_folder_is_small_and_not_written_over_something(folder, tmp_path):
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 4 * 2**20, size  # "a few MB": 1.6 MiB measured
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                        "text_encoder_2", "tokenizer", "tokenizer_2",
                                                        "transformer", "vae"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        write_tiny_flux_pipeline(tmp_path / "busy")
    with pytest.raises(TypeError, match="`seed`: expected an int"):
        write_tiny_flux_pipeline(tmp_path / "new", seed="0")


def test_the_command_writes_a_loadable_folder_and_students_load_from_it(tmp_path, capsys):
    assert cli.main(["tiny", "--output_dir", str(tmp_path / "f"), "--seed", "3"]) == 0
    assert f"(seed 3, 1.6 MiB) to {tmp_path / 'f'}" in capsys.readouterr().out
    from t2i_distill.models import load_student

    student, report = load_student(str(tmp_path / "f"), kind="flow")
    assert student.config.in_channels == TINY_PIPELINE_TRANSFORMER["in_channels"]
