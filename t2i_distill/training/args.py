"""Command-line flags of ``t2i-distill train scm|meanflow`` and ``rescale``: the reference's flag names, so
its scripts port over, plus the fork's own (backend, JVP mode, EMA, data sources, cache, validation, NaN guard).

``--config FILE`` (YAML or JSON, a mapping of flag names without ``--``) may set any flag; flags on the command line
win over the file. An unknown key in the file, an unknown flag, or a contradictory combination is an error naming the
flag. Differences from the reference's parser, each on purpose:

* ``--prodigy_*`` booleans parse "false"/"0"/"no" as False (the reference's ``type=bool`` made every value True, B13);
* ``--validation_prompts`` (nargs +) is used (the reference declares its validation flags and never uses them);
* the reference's ``--ds_file`` is kept as an alias of ``--deepspeed_config``;
* ``--seed 0`` is a seed (the reference's inference treated 0 as "unseeded").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from t2i_distill.flag_types import (
    finite_float,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    unit_interval,
)

__all__ = ["METHODS", "build_parser", "parse_args", "str2bool"]

METHODS = ("scm", "meanflow", "rescale")
BACKENDS = ("auto", "single", "ddp", "fsdp2", "deepspeed")
JVP_MODES = ("auto", "dual", "func", "reference", "fd")


def str2bool(value: str | bool) -> bool:
    """'true'/'1'/'yes'/'on' → True, 'false'/'0'/'no'/'off' → False (case-insensitive); anything else is an error."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {value!r}")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="diffusers FLUX folder or hub id (teacher, student init, text encoders, VAE); required")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g.add_argument("--cache_dir", default=None, help="hub cache folder (passed to from_pretrained)")
    g.add_argument("--rescaled_checkpoint_path", default=None,
                   help="the ×1 (rescaled) teacher: the reference's .pt {'module': sd}, .safetensors, sharded "
                        "safetensors or a transformer folder, loaded into teacher and student (a flow model: a "
                        "student checkpoint is refused). Not needed with a folder written by `t2i-distill rescale`; "
                        "without either, the stock folder's weights train at ×1000")
    g.add_argument("--time_scale", type=positive_float, default=None,
                   help="time/guidance input scale; default: the scale the weights were trained at (a stock folder "
                        "×1000, a rescaled checkpoint or folder ×1). A value that differs from the weights' is refused")
    g.add_argument("--time_embedding_fp32", type=str2bool, default=None,
                   help="compute the time/guidance sinusoids and embedding MLPs in float32 (default: on at ×1000, as "
                        "rCM; off at ×1, as the reference)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="hub id (loaded only when named), or a local imagefolder / parquet / arrow / .tar path or glob")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--train_data_dir", default=None, help="a local imagefolder (metadata.jsonl/.csv captions)")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default="text", help="caption column (the reference's data: 'llava')")
    g.add_argument("--max_train_samples", type=positive_int, default=None)
    g.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it")
    g.add_argument("--cached_dataset", default=None,
                   help="a cache written by `t2i-distill cache`: no text encoder or VAE is loaded")
    g.add_argument("--resolution", type=positive_int, default=512)
    g.add_argument("--max_sequence_length", type=positive_int, default=256, help="T5 tokens")
    g.add_argument("--dataloader_num_workers", type=nonnegative_int, default=0)

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=positive_int, default=4, help="micro-batch per process")
    g.add_argument("--num_train_epochs", type=positive_int, default=1)
    g.add_argument("--max_train_steps", type=positive_int, default=None,
                   help="optimizer steps (overrides --num_train_epochs)")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each block in the backward, in every --jvp mode (never switched on unless asked, "
                        "unlike B4)")
    g.add_argument("--learning_rate", type=positive_float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="lr × accumulation × batch × processes")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"])
    g.add_argument("--lr_warmup_steps", type=nonnegative_int, default=500)
    g.add_argument("--lr_num_cycles", type=positive_int, default=1)
    g.add_argument("--lr_power", type=finite_float, default=1.0)
    g.add_argument("--optimizer", default="adamw", type=str.lower, choices=["adamw", "prodigy"])
    g.add_argument("--adam_beta1", type=unit_interval, default=0.9)
    g.add_argument("--adam_beta2", type=unit_interval, default=0.999)
    g.add_argument("--adam_epsilon", type=positive_float, default=1e-8)
    g.add_argument("--adam_weight_decay", type=nonnegative_float, default=1e-4)
    g.add_argument("--prodigy_beta3", type=unit_interval, default=None)
    g.add_argument("--prodigy_decouple", type=str2bool, default=True)
    g.add_argument("--prodigy_use_bias_correction", type=str2bool, default=True)
    g.add_argument("--prodigy_safeguard_warmup", type=str2bool, default=True)
    g.add_argument("--max_grad_norm", type=nonnegative_float, default=1.0,
                   help="clip the global grad norm (every backend; 0 disables); the pre-clip norm is logged")
    g.add_argument("--ema_decay", type=finite_float, default=None, help="keep an EMA of the student (off by default)")
    g.add_argument("--export_ema", type=str2bool, default=None,
                   help="also export the EMA weights as transformer_<step>_ema.safetensors (default: on with "
                        "--ema_decay); `sample --student_checkpoint` takes either file")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--seed", type=nonnegative_int, default=None, help="0 is a seed; each rank draws from seed + rank")

    g = p.add_argument_group("distribution and precision")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: deepspeed when --deepspeed_config is given, ddp with several processes, else single")
    g.add_argument("--deepspeed_config", "--ds_file", dest="deepspeed_config", default=None,
                   help="a DeepSpeed JSON (parallel_config/); implies --backend deepspeed. Its micro-batch, "
                        "accumulation, gradient_clipping and bf16.enabled are taken for the flags not given; a given "
                        "flag that differs is refused")
    g.add_argument("--mixed_precision", default=None, choices=["no", "bf16"],
                   help="default: the DeepSpeed JSON's bf16.enabled when it sets one, else bf16 on CUDA and no on CPU")
    g.add_argument("--cpu", action="store_true", help="train on the CPU (gloo), e.g. for tests")
    g.add_argument("--fd_epsilon", type=positive_float, default=1e-3,
                   help="--jvp fd: the finite-difference step along the tangent (time units of the loss)")
    g.add_argument("--jvp", default="auto", choices=JVP_MODES,
                   help="auto: dual on CUDA, reference on a CPU (where the Triton "
                        "kernels run in the slow interpreter); dual: one fused primal+tangent pass; func: "
                        "torch.func.jvp over the kernel-patched student; "
                        "reference: torch.func.jvp with math attention, as the reference; fd: a forward finite "
                        "difference (rCM's Δt / FastGen's use_jvp_finite_diff), one extra no-grad forward, step "
                        "--fd_epsilon (needs float32 times: in bf16 ε must exceed the time's rounding). rescale has "
                        "no JVP: "
                        "dual/func run its student on the Triton kernels, reference on diffusers' attention")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output_dir", default="t2i-distill-output")
    g.add_argument("--checkpointing_steps", type=positive_int, default=500)
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start from step 0 in an --output_dir that holds an earlier run's checkpoints, removing them "
                        "and its exports (without this or --resume_from_checkpoint, such a folder is refused)")
    g.add_argument("--save_pt", action="store_true",
                   help="also export the reference's {'module': state_dict} transformer_<step>.pt")
    g.add_argument("--export_layout", default="ours", choices=["ours", "reference"],
                   help="ours: output_dir/transformer_<step>.safetensors; reference: also output_dir/ckpts/"
                        "transformer_<step>.pt, where the reference's GenEval scripts read it")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"])
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--tracker_project_name", default=None)
    g.add_argument("--validation_prompts", "--validation_prompt", dest="validation_prompts", nargs="+", default=None)
    g.add_argument("--num_validation_images", type=positive_int, default=1, help="images per prompt")
    g.add_argument("--validation_steps", type=positive_int, default=500)
    g.add_argument("--validation_inference_steps", type=positive_int, nargs="+", default=[1, 2, 4])
    g.add_argument("--validation_guidance_scale", type=nonnegative_float, default=None,
                   help="default: the first training guidance value")
    g.add_argument("--max_nonfinite_steps", type=positive_int, default=10,
                   help="stop after this many consecutive steps with a NaN/inf loss (each is skipped and counted)")
    g.add_argument("--min_free_disk_gb", type=nonnegative_float, default=1.0,
                   help="refuse to start when --output_dir has less free space")
    g.add_argument("--config", default=None,
                   help="YAML/JSON file of flag values, keyed by flag name or alias without '--' (command-line flags "
                        "win)")

    g = p.add_argument_group("accepted from the reference's launch scripts, ignored (each warns once)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="passed by deepspeed and older torch launchers; the trainer reads LOCAL_RANK from the "
                        "environment, as the reference did")
    g.add_argument("--adam_weight_decay_text_encoder", type=finite_float, default=None,
                   help="the reference declares it and never uses it: the text encoders are frozen")


def _add_scm(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sCM")
    g.add_argument("--sigma_data", type=positive_float, default=0.5)
    g.add_argument("--logit_mean", type=finite_float, default=0.0, help="P_mean (the reference's scripts: 0.2)")
    g.add_argument("--logit_std", type=positive_float, default=1.0, help="P_std (the reference's scripts: 1.6)")
    g.add_argument("--scm_cfg_scale", type=nonnegative_float, nargs="+", default=[4.0, 4.5, 5.0])
    g.add_argument("--tangent_warmup_steps", type=nonnegative_int, default=4000)
    g.add_argument("--scm_lambda", type=finite_float, default=1.0)
    g.add_argument("--time_sampler_sigma", default="sigma_data", choices=["sigma_data", "reference"],
                   help="σ in t = arctan(σ/·): --sigma_data (fix of B9) or the reference's hard-coded 0.5")


def _add_meanflow(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MeanFlow")
    g.add_argument("--cfg_scale", type=nonnegative_float, nargs="+", default=[4.0, 4.5, 5.0])
    g.add_argument("--time_sampler", default="logit_normal", choices=["logit_normal", "uniform"])
    g.add_argument("--time_mu", type=finite_float, default=-0.4)
    g.add_argument("--time_sigma", type=positive_float, default=1.0)
    g.add_argument("--ratio_r_not_equal_t", type=finite_float, default=0.75,
                   help="fraction of samples with r ≠ t (the reference's comment says the opposite, B3)")
    g.add_argument("--adaptive_p", type=finite_float, default=1.0)
    g.add_argument("--cfg_omega", type=finite_float, default=1.0)
    g.add_argument("--cfg_kappa", type=finite_float, default=0.0)
    g.add_argument("--cfg_min_t", type=finite_float, default=0.0)
    g.add_argument("--cfg_max_t", type=finite_float, default=1.0)
    g.add_argument("--use_cfg_meanflow", type=str2bool, nargs="?", const=True, default=False)
    g.add_argument("--path_type", default="linear", choices=["linear", "cosine"])
    g.add_argument("--weighting", default="adaptive", choices=["adaptive", "uniform"])
    g.add_argument("--cfg_prob", type=finite_float, default=0.1, help="prompt-dropout probability")
    g.add_argument("--cfg_velocity_at", default="t", choices=["t", "r_t"],
                   help="u_c/u_u of CFG-MeanFlow at (t, t) (paper) or at (r, t) (the reference, B1)")
    g.add_argument("--meanflow_tangent", default="teacher", choices=["teacher", "data"],
                   help="non-CFG JVP tangent: the teacher velocity, or ε − x0 as the reference (B2)")


def _add_lora(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA student (peft, the lora extra; README: LoRA students)")
    g.add_argument("--lora_rank", type=nonnegative_int, default=0,
                   help="0: train every student weight; r > 0: freeze them and train a rank-r LoRA adapter on "
                        "--lora_target_modules, sCM's logvar_linear / MeanFlow's timestep_embedder2 in full. The "
                        "transformer exports then hold the merged weights, adapter_<step>.safetensors the adapter")
    g.add_argument("--lora_alpha", type=positive_float, default=None,
                   help="the adapter's output is scaled by alpha/rank (None: the rank, a scale of 1)")
    g.add_argument("--lora_target_modules", nargs="+", default=None,
                   help="linear layers to adapt, by name or last dotted parts, as peft matches them (None: the "
                        "attention and feed-forward linears of both block kinds, t2i_distill.training.lora."
                        "DEFAULT_LORA_TARGETS)")
    g.add_argument("--lora_dropout", type=unit_interval, default=0.0,
                   help="dropout on the adapter's input (not with --jvp fd, whose two forwards would draw two masks)")


def _add_rescale(p: argparse.ArgumentParser) -> None:
    from t2i_distill.losses.rescale import RESCALE_TIME_SAMPLERS
    from t2i_distill.training.rescale import EMBEDDER_INITS

    g = p.add_argument_group("rescale (the paper's ×1 teacher; README: why these defaults)")
    g.add_argument("--smooth_l1_beta", type=positive_float, default=1.0,
                   help="β of the smooth-L1 loss (default: %(default)s)")
    g.add_argument("--rescale_time_sampler", default="uniform", choices=RESCALE_TIME_SAMPLERS,
                   help="flow time t in [0, 1] shared by both models (default: %(default)s)")
    g.add_argument("--rescale_time_mu", type=finite_float, default=0.0,
                   help="logit_normal: mean (default: %(default)s)")
    g.add_argument("--rescale_time_sigma", type=positive_float, default=1.0,
                   help="logit_normal: std (default: %(default)s)")
    g.add_argument("--rescale_guidance_range", type=nonnegative_float, nargs=2, default=[1.0, 6.0],
                   metavar=("MIN", "MAX"),
                   help="guidance drawn uniformly in [MIN, MAX]")
    g.add_argument("--embedder_init", default="frequency_map", choices=EMBEDDER_INITS,
                   help="student time/guidance embedders: remap the ×1000 sinusoid columns to ×1 (frequency_map) or "
                        "keep the teacher's (copy) (default: %(default)s)")
    g.add_argument("--rescale_gap_batches", type=positive_int, default=2,
                   help="fixed evaluation batches of the rescale gap (default: %(default)s)")
    g.add_argument("--rescale_gap_buckets", type=positive_int, default=4,
                   help="time buckets of the rescale gap (default: %(default)s)")


#: One line for every flag the groups above leave without one (kept here so the groups stay readable).
_MORE_HELP = {
    "revision": "hub revision (branch, tag or commit) of --pretrained_model_name_or_path",
    "variant": "weights variant of the folder, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)",
    "dataset_config_name": "the hub dataset's configuration name",
    "dataset_split": "the dataset split to train on",
    "image_column": "image column of --dataset_name / --train_data_dir",
    "max_train_samples": "use only the first N records (debugging)",
    "resolution": "training image side in pixels (resize shorter side, centre crop); a multiple of 16",
    "dataloader_num_workers": "data-loading worker processes per rank (0: in the training process)",
    "num_train_epochs": "epochs, when --max_train_steps is not given",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "learning_rate": "peak learning rate (the reference's scripts: 1e-5)",
    "lr_scheduler": "diffusers learning-rate schedule",
    "lr_warmup_steps": "warm-up optimizer steps (never multiplied by the process count)",
    "lr_num_cycles": "cosine_with_restarts: number of restarts",
    "lr_power": "polynomial: power",
    "optimizer": "adamw (torch) or prodigy (the prodigy extra)",
    "adam_beta1": "AdamW/Prodigy β1",
    "adam_beta2": "AdamW/Prodigy β2",
    "adam_epsilon": "AdamW/Prodigy ε",
    "adam_weight_decay": "AdamW/Prodigy weight decay (decoupled)",
    "prodigy_beta3": "Prodigy β3 (None: sqrt(β2))",
    "prodigy_decouple": "Prodigy: decoupled weight decay (true/false)",
    "prodigy_use_bias_correction": "Prodigy: bias correction (true/false)",
    "prodigy_safeguard_warmup": "Prodigy: safeguard warm-up (true/false)",
    "allow_tf32": "TF32 matmuls and convolutions on Ampere+ GPUs",
    "output_dir": "checkpoints, exports, args.json and logs go here",
    "checkpointing_steps": "save checkpoint-<step> (and export the student) every N optimizer steps",
    "checkpoints_total_limit": "keep only the newest N checkpoints (older ones pruned after a new one is complete)",
    "report_to": "trackers, on the main rank",
    "tracker_project_name": "W&B project (default: t2i-distill-<method>)",
    "validation_prompts": "prompts of the validation grids (none: no validation images)",
    "validation_steps": "validation grids (rescale: the rescale gap) every N optimizer steps",
    "validation_inference_steps": "sampler step counts of the validation grids",
    "sigma_data": "σ_d of TrigFlow: data scale (x̂ = x/σ_d)",
    "scm_cfg_scale": "guidance values drawn per sample (the teacher's guidance embedding)",
    "tangent_warmup_steps": "steps over which the sCM tangent's weight ramps from 0 to 1",
    "scm_lambda": "weight of the sCM loss",
    "cfg_scale": "guidance values drawn per sample (the teacher's guidance embedding)",
    "time_sampler": "distribution of t (and r)",
    "time_mu": "logit_normal: mean",
    "time_sigma": "logit_normal: standard deviation",
    "adaptive_p": "adaptive weighting power p: loss / (loss + ε)^p",
    "cfg_omega": "CFG-MeanFlow ω (weight of the teacher velocity)",
    "cfg_kappa": "CFG-MeanFlow κ (weight of the student's conditional velocity)",
    "cfg_min_t": "CFG-MeanFlow applies for t in [cfg_min_t, cfg_max_t]",
    "cfg_max_t": "CFG-MeanFlow applies for t in [cfg_min_t, cfg_max_t]",
    "use_cfg_meanflow": "CFG-MeanFlow targets (true/false; the reference's scripts: true)",
    "path_type": "interpolant between data and noise",
    "weighting": "adaptive (MeanFlow's) or uniform loss weighting",
}

_DESCRIPTIONS = {"scm": "sCM distillation of FLUX", "meanflow": "MeanFlow distillation of FLUX",
                 "rescale": "the paper's ×1 teacher: distil the stock ×1000 FLUX transformer into an identical ×1 copy"}


def build_parser(method: str) -> argparse.ArgumentParser:
    """The parser of ``t2i-distill train <method>`` (``rescale``: ``t2i-distill rescale``)."""
    if method not in METHODS:
        raise ValueError(f"`method`: expected one of {METHODS}, got {method!r}")
    prog = "t2i-distill rescale" if method == "rescale" else f"t2i-distill train {method}"
    p = argparse.ArgumentParser(prog=prog, description=_DESCRIPTIONS[method],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="B1-B13 refer to the reference's bugs and the flags that keep its behaviour "
                                       "reachable: docs/reference-bugs.md")
    _add_common(p)
    {"scm": _add_scm, "meanflow": _add_meanflow, "rescale": _add_rescale}[method](p)
    if method != "rescale":  # rescale trains the whole ×1 copy: its time embedders must change everywhere
        _add_lora(p)
    for action in p._actions:
        if action.help is None:
            action.help = _MORE_HELP.get(action.dest)
        if action.help and "(default:" in action.help:  # the formatter adds "(default: …)" itself
            action.help = action.help.replace(" (default: %(default)s)", "").replace("(default: %(default)s)", "")
    return p


def _load_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config: {path!r} is not a file")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:  # pragma: no cover - PyYAML ships with the stack (transformers/accelerate)
            raise ValueError("--config: reading YAML needs PyYAML (pip install pyyaml), or use a .json file") from error
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config: {path!r} is not valid JSON ({error}); YAML needs a .yaml suffix") from error
    if not isinstance(data, dict):
        raise ValueError(f"--config: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def parse_args(method: str, argv: list[str] | None = None, check_files: bool = False) -> argparse.Namespace:
    """Parse and validate; raise ``SystemExit`` (argparse's error) listing every problem at once, each naming its flag.

    Besides the flags' own checks: the DeepSpeed JSON's settings are taken for the flags not given (or refused when a
    given flag differs), optional packages are checked, ``--jvp auto`` is resolved (:mod:`.preflight`), and with
    ``check_files`` the model folder and checkpoint are checked from their configs and headers (nothing loads).
    """
    import torch

    from t2i_distill.training.preflight import explicit_flags, missing_packages, resolve_jvp, take_deepspeed_settings

    parser = build_parser(method)
    if int(os.environ.get("RANK", "0")) != 0:  # every rank parses the same flags: rank 0 alone prints the refusal
        parser.error = lambda message: sys.exit(2)  # type: ignore[method-assign]
    elif os.environ.get("T2I_ERROR_DIR"):  # under scripts/train.sh: also repeated after torchrun's banner
        show = parser.error

        def error(message: str):
            try:
                Path(os.environ["T2I_ERROR_DIR"], "rank00000.txt").write_text(
                    f"{parser.prog}: error: {message}\n", encoding="utf-8")
            except OSError:
                pass
            show(message)

        parser.error = error  # type: ignore[method-assign]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    values = {}
    if known.config:
        try:
            values = _load_config_file(known.config)
        except ValueError as error:
            parser.error(str(error))
        dests = {a.dest: a for a in parser._actions}
        # Every alias works as a key (e.g. the reference's `ds_file`), dashes or underscores.
        aliases = {option.lstrip("-").replace("-", "_"): action.dest for action in parser._actions
                   for option in action.option_strings}
        values = {aliases.get(str(key).replace("-", "_"), key): value for key, value in values.items()}
        unknown = sorted(set(values) - set(dests) - {"config"})
        if unknown:
            parser.error(f"--config {known.config}: unknown flag(s) {', '.join(unknown)} for `train {method}`")
        converted = {}
        for key, value in values.items():
            action = dests.get(key)
            if action is not None and action.type is not None and value is not None:
                try:
                    value = [action.type(v) for v in value] if isinstance(value, list) else action.type(value)
                except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
                    parser.error(f"--config {known.config}: {key}: {error}")
            converted[key] = value
        parser.set_defaults(**converted)
    args = parser.parse_args(argv)
    args.method = method
    explicit = explicit_flags(parser, argv, config_keys=values)
    problems = validate_args(args)
    cuda = torch.cuda.is_available() and not args.cpu
    ds_problems, notes = take_deepspeed_settings(args, explicit, cuda)
    problems += ds_problems
    backend = args.backend if args.backend != "auto" else ("deepspeed" if args.deepspeed_config else "ddp/single")
    problems += missing_packages(args, backend)
    note = resolve_jvp(args, cuda)
    ignored = [f"--{dest} is accepted for the reference's scripts and ignored: {why}" for dest, why in (
        ("local_rank", "the trainer reads LOCAL_RANK from the environment (torchrun and deepspeed set it)"),
        ("adam_weight_decay_text_encoder", "the text encoders are frozen (the reference never used it either)"),
    ) if dest in explicit]
    if check_files and args.pretrained_model_name_or_path:
        from t2i_distill.errors import ConfigurationError
        from t2i_distill.training.model_check import check_models

        try:
            check_models(args)
        except ConfigurationError as error:
            problems.append(str(error))
        if getattr(args, "lora_rank", 0):
            from t2i_distill.training.lora import check_lora_targets

            problems += check_lora_targets(args)
    if problems:
        parser.error(problems[0] if len(problems) == 1 else
                     f"{len(problems)} problems:\n" + "\n".join(f"  - {problem}" for problem in problems))
    args.preflight_notes = notes + ([note] if note else []) + ignored
    return args


def validate_args(args: argparse.Namespace) -> list[str]:
    """Every contradictory or impossible combination, each naming its flags (empty when the arguments are fine)."""
    problems = []
    if not args.pretrained_model_name_or_path:
        problems.append("--pretrained_model_name_or_path is required (a FLUX folder or hub id)")
    sources = [f for f in ("dataset_name", "train_data_dir", "cached_dataset") if getattr(args, f)]
    if len(sources) != 1:
        problems.append("give exactly one of --dataset_name, --train_data_dir, --cached_dataset; got "
                        + (", ".join(f"--{s}" for s in sources) or "none"))
    if args.deepspeed_config and args.backend not in ("auto", "deepspeed"):
        problems.append(f"--deepspeed_config was given but --backend is {args.backend!r} (use deepspeed or auto)")
    if args.backend == "deepspeed" and not args.deepspeed_config:
        problems.append("--backend deepspeed needs --deepspeed_config (a JSON of parallel_config/)")
    if args.max_grad_norm is not None and args.max_grad_norm < 0:
        problems.append(f"--max_grad_norm must be ≥ 0 (0 disables clipping), got {args.max_grad_norm}")
    if args.ema_decay is not None and not 0.0 < args.ema_decay < 1.0:
        problems.append(f"--ema_decay must lie in (0, 1), got {args.ema_decay}")
    if args.export_ema and args.ema_decay is None:
        problems.append("--export_ema needs an EMA: give --ema_decay")
    if args.resolution % 16:
        problems.append(f"--resolution must be a multiple of 16 (8× VAE, 2×2 patches), got {args.resolution}")
    if args.cpu and args.mixed_precision == "bf16":
        problems.append("--mixed_precision bf16 is for GPUs; drop it with --cpu")
    if args.method == "rescale":
        if args.rescaled_checkpoint_path:
            problems.append("--rescaled_checkpoint_path: rescale starts from the stock ×1000 folder and writes the ×1 "
                            "teacher; it takes no rescaled checkpoint")
        if args.time_scale is not None:
            problems.append(f"--time_scale {args.time_scale:g}: rescale's teacher runs at the stock folder's ×1000 and "
                            "its student at ×1; drop the flag")
        if args.validation_prompts:
            problems.append("--validation_prompts: rescale samples no images; it reports the rescale gap every "
                            "--validation_steps (sample its output with `t2i-distill sample --method teacher`)")
        if not args.smooth_l1_beta > 0:
            problems.append(f"--smooth_l1_beta must be > 0, got {args.smooth_l1_beta}")
        low, high = args.rescale_guidance_range
        if not 0 <= low <= high:
            problems.append(f"--rescale_guidance_range must be MIN MAX with 0 <= MIN <= MAX, got {low:g} {high:g}")
    elif args.time_scale is not None and not args.time_scale > 0:
        problems.append(f"--time_scale must be > 0, got {args.time_scale}")
    if args.method == "meanflow":
        if not 0.0 <= args.ratio_r_not_equal_t <= 1.0:
            problems.append(f"--ratio_r_not_equal_t must lie in [0, 1], got {args.ratio_r_not_equal_t}")
        if not 0.0 <= args.cfg_prob < 1.0:
            problems.append(f"--cfg_prob must lie in [0, 1), got {args.cfg_prob}")
        if args.cfg_min_t > args.cfg_max_t:
            problems.append(f"--cfg_min_t ({args.cfg_min_t}) exceeds --cfg_max_t ({args.cfg_max_t})")
        if args.use_cfg_meanflow and args.cfg_prob == 0.0:
            problems.append("--use_cfg_meanflow needs unconditional samples: --cfg_prob must be > 0")
    elif args.method == "scm" and args.sigma_data <= 0:
        problems.append(f"--sigma_data must be positive, got {args.sigma_data}")
    if not args.resume_from_checkpoint and not args.overwrite_output_dir:
        from t2i_distill.training.run_record import existing_run_outputs

        earlier = existing_run_outputs(args.output_dir)
        if earlier:
            more = f" (+{len(earlier) - 5} more)" if len(earlier) > 5 else ""
            shown = ", ".join(p.name for p in earlier[:5]) + more
            problems.append(f"--output_dir {args.output_dir!r} holds an earlier run ({shown}); continue it with "
                            "--resume_from_checkpoint latest, or start over with --overwrite_output_dir (which "
                            "removes those), or choose another --output_dir")
    problems += _lora_problems(args)
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        problems.append("--resume_from_checkpoint and --overwrite_output_dir contradict each other; give one")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        problems.append(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is neither 'latest' nor a folder")
    return problems


def _lora_problems(args: argparse.Namespace) -> list[str]:
    """LoRA flags without ``--lora_rank``, and adapter dropout where the tangent would not be a derivative."""
    if not hasattr(args, "lora_rank"):  # rescale has no LoRA flags
        return []
    if isinstance(args.lora_target_modules, str):  # a --config file's `lora_target_modules: to_q to_k`
        args.lora_target_modules = args.lora_target_modules.split()
    if not args.lora_rank:
        given = [f"--{name}" for name in ("lora_alpha", "lora_target_modules") if getattr(args, name) is not None]
        given += ["--lora_dropout"] if args.lora_dropout else []
        return [f"{', '.join(given)} configure(s) a LoRA adapter, but --lora_rank is 0 (full fine-tuning): give "
                "--lora_rank N with N >= 1, or drop them"] if given else []
    if args.lora_dropout and args.jvp == "fd":
        return [f"--lora_dropout {args.lora_dropout:g} with --jvp fd: the finite difference's two forwards would draw "
                "two dropout masks, so their difference is mask noise / --fd_epsilon, not a tangent; use "
                "--lora_dropout 0, or --jvp dual, func or reference (each takes the tangent of one pass, one mask)"]
    return []
