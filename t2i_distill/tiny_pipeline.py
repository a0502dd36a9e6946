"""A complete, tiny, randomly initialised FLUX pipeline folder that diffusers' ``FluxPipeline.from_pretrained`` loads
offline: what tests, the demo and every ``--pretrained_model_name_or_path`` example use on machines without the hub.

``t2i-distill tiny --output_dir DIR [--seed S]`` (or :func:`write_tiny_flux_pipeline`) writes::

    DIR/model_index.json
    DIR/transformer/      FluxTransformer2DModel: 1 double + 1 single block, 2 heads × 32, guidance embeds on,
                          in_channels 64 (16 latent channels × 2×2 patch, as FLUX)
    DIR/vae/              AutoencoderKL, 16 latent channels, 8× downsampling (4 blocks), FLUX's shift/scale factors
    DIR/text_encoder/     CLIPTextModel (hidden 32 → pooled 32), DIR/tokenizer/ a CLIP BPE tokenizer
    DIR/text_encoder_2/   T5EncoderModel (d_model 32),           DIR/tokenizer_2/ a T5 unigram tokenizer
    DIR/scheduler/        FlowMatchEulerDiscreteScheduler with FLUX-dev's dynamic-shift config

The tokenizers are built here, from a fixed word list (colours, shapes, counts, objects) plus a character fallback,
so any prompt tokenises and nothing is downloaded. Weights are random (seeded): the folder has FLUX's structure and
every real loading path, not a model that draws anything.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from t2i_distill.tiny import TINY_FLUX_CONFIG

__all__ = ["TINY_PIPELINE_TRANSFORMER", "TINY_VOCABULARY", "build_tiny_flux_pipeline", "write_tiny_flux_pipeline"]

#: The transformer of the tiny folder (stock diffusers class; ``load_student`` reads it as a student or teacher).
TINY_PIPELINE_TRANSFORMER: dict[str, object] = {
    **TINY_FLUX_CONFIG,
    "in_channels": 64,  # a pipeline packs 16 VAE latent channels in 2×2 patches, as FLUX
}

#: Whole words the tiny tokenizers know (anything else falls back to characters).
TINY_VOCABULARY: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "on", "in", "with", "photo", "picture", "image", "left", "right", "above", "below",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "grey",
    "circle", "circles", "square", "squares", "triangle", "triangles", "shape", "shapes",
    "cat", "dog", "car", "bird", "person", "apple", "banana", "cup", "chair", "clock",
)

_FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as the tokenizer runs it: repeatedly merge the lowest-ranked adjacent pair (leftmost first)."""
    while True:
        found = [(ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:])) if pair in ranks]
        if not found:
            return pieces
        _, i = min(found)
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2:]]


def _clip_tokenizer():
    """A CLIP BPE tokenizer: characters (with ``</w>`` word-end forms) + merges that make every word one token.

    Each word's merges are appended after running the merges so far on it, combining *that* segmentation left to
    right: a merge added for a later word ranks below all of an earlier word's merges, so it can never split one
    (appending each word's letter pairs blindly would let "red"'s ("r", "e") break "green" into four tokens).
    """
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in TINY_VOCABULARY:
        pieces = _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks.setdefault((left, right), len(ranks))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for token in specials:
        vocab[token] = len(vocab)
    merges = sorted(ranks, key=ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer():
    """A T5 unigram tokenizer: ids 0/1/2 = pad/eos/unk (T5's layout), whole words, then single characters."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + word, -1.0) for word in TINY_VOCABULARY]
    pieces += [("▁", -2.0)] + [(c, -5.0) for c in sorted(set(string.ascii_letters + string.digits
                                                            + string.punctuation))]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_flux_pipeline(seed: int = 0):
    """The tiny ``FluxPipeline`` in memory (fp32, CPU), every weight drawn from ``seed``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed`: expected an int, got {type(seed).__name__}")
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TINY_PIPELINE_TRANSFORMER)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.1159, scaling_factor=0.3611,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        ))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**_FLUX_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def write_tiny_flux_pipeline(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny pipeline folder (safetensors weights) to ``output_dir`` and return its path.

    Raises ``FileExistsError`` when ``output_dir`` exists and is not empty (nothing of the user's is overwritten).
    """
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"`output_dir` {str(out)!r} exists and is not an empty folder; choose a new path")
    pipe = build_tiny_flux_pipeline(seed)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# -- command line -----------------------------------------------------------------------------------------------
def add_subparser(subparsers) -> None:
    from t2i_distill.flag_types import nonnegative_int

    p = subparsers.add_parser("tiny", help="write a tiny random FLUX pipeline folder that FluxPipeline loads offline")
    p.add_argument("--output_dir", required=True, help="new (or empty) folder to write")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every weight (default: %(default)s)")
    p.set_defaults(func=_cmd_tiny)


def _cmd_tiny(args) -> int:
    path = write_tiny_flux_pipeline(args.output_dir, seed=args.seed)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote a tiny FLUX pipeline (seed {args.seed}, {size / 2**20:.1f} MiB) to {path}")
    return 0
