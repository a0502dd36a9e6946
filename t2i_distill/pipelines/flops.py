"""Per-image FLOP counts of the samplers' transformer work (matmul FLOPs = 2 × multiply-adds).

A FLUX forward over L = Lt + Li tokens (D = heads × head dim, MLP 4D):

* each double block: 12·D² MACs per token (img and txt streams: qkv 3D², output D², MLP 8D²) + attention
  2·L²·D (QKᵀ and PV) + two AdaLN-Zero linears D → 6D per sample;
* each single block: 12·D² per token (qkv 3D², ``proj_mlp`` 4D², ``proj_out`` 5D·D) + 2·L²·D + one D → 3D;
* outside the blocks: ``x_embedder`` (in → D per image token), ``context_embedder`` (joint → D per text token),
  the time / guidance / pooled-text MLPs (256 → D → D, pooled → D → D), MeanFlow's second time MLP, ``norm_out``'s
  D → 2D and ``proj_out`` (D → out per image token).

Norms, softmax, RoPE and other elementwise work are not counted (a fraction of a percent at FLUX sizes); neither are
the text encoders and the VAE decode, which every sampler runs once per image alike. At FLUX.1-lite-8B
(8 + 38 blocks, D 3072) a forward is ≈ 14.3 TFLOP at 512 px and ≈ 56 TFLOP at 1024 px (reference-spec §6.1).
The count equals ``torch.utils.flop_counter.FlopCounterMode`` on diffusers' model (tested on a tiny one).
"""

from __future__ import annotations

from collections.abc import Mapping

from t2i_distill.pipelines.loading import DEFAULT_STEPS, METHODS

__all__ = ["LITE_8B_CONFIG", "pipeline_flops_per_image", "transformer_forward_flops"]

#: FLUX.1-lite-8B's transformer (FLUX.1-dev with 8 of its 19 double blocks).
LITE_8B_CONFIG: dict[str, object] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 8, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
}


def transformer_forward_flops(config: Mapping, image_tokens: int, text_tokens: int, batch: int = 1,
                              dual_timestep: bool = False) -> int:
    """FLOPs of one transformer forward of ``batch`` samples (``config``: a FLUX transformer config mapping)."""
    for name, value in (("image_tokens", image_tokens), ("text_tokens", text_tokens), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}`: expected a positive int, got {value!r}")
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    channels = int(config["in_channels"])
    out_channels = int(config.get("out_channels") or channels)
    li, lt = image_tokens, text_tokens
    joint = li + lt
    per_block_tokens = 12 * d * d * joint
    attention = 2 * joint * joint * d
    double = int(config["num_layers"]) * (per_block_tokens + attention + 2 * d * 6 * d)
    single = int(config["num_single_layers"]) * (per_block_tokens + attention + d * 3 * d)
    time_mlp = 256 * d + d * d
    embed = (time_mlp * (1 + bool(config.get("guidance_embeds")) + bool(dual_timestep))
             + int(config["pooled_projection_dim"]) * d + d * d)
    edges = channels * d * li + int(config["joint_attention_dim"]) * d * lt + embed + d * 2 * d + d * out_channels * li
    return 2 * batch * (double + single + edges)


def pipeline_flops_per_image(method: str, num_inference_steps: int | None = None, *, resolution: int = 1024,
                             text_tokens: int = 256, config: Mapping = LITE_8B_CONFIG) -> int:
    """Transformer FLOPs to generate one image: steps × one forward (one call per step for all three samplers:
    guidance is embedded, never a second CFG pass). ``resolution``: pixels (FLUX: 16 px per image token side)."""
    if method not in METHODS:
        raise ValueError(f"`method`: expected one of {METHODS}, got {method!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16 or resolution % 16:
        raise ValueError(f"`resolution`: expected a positive multiple of 16 pixels, got {resolution!r}")
    steps = DEFAULT_STEPS[method] if num_inference_steps is None else num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`num_inference_steps`: expected an int ≥ 1, got {steps!r}")
    image_tokens = (resolution // 16) ** 2
    return steps * transformer_forward_flops(config, image_tokens, text_tokens, dual_timestep=method == "meanflow")
