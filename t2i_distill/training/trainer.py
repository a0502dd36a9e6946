"""``t2i-distill train scm|meanflow``: the reference's ``train_sCM.py`` / ``train_meanflow.py`` rebuilt on the fork's
losses, kernels, data and engine, with the reference's bugs fixed (reference-spec §5).

The trainer is thin: it parses flags (:mod:`t2i_distill.training.args`), builds the models
(:func:`t2i_distill.models.load_student`), the data (:class:`t2i_distill.data.TrainData`), the engine
(:func:`t2i_distill.training.build_engine`: single process, DDP, FSDP2 or DeepSpeed ZeRO-2) and the checkpoints
(:class:`t2i_distill.training.CheckpointManager`), then loops. The loss is computed inside
:class:`DistillationPair`'s ``forward`` so that every backend sees one forward per micro-step (DDP's reducer and
DeepSpeed's engine need the forward to go through their wrapper), exactly as the reference hands its teacher-student
pair to ``accelerator.prepare``.

Per optimizer step: a batch (live: encoded here with the frozen text encoders and VAE; cached: read as is), the loss
(teacher forward, student JVP by ``--jvp``, student forward with grad), a finiteness vote across ranks (a NaN/inf loss
skips the step everywhere, is counted, and ``--max_nonfinite_steps`` in a row stop the run with the last good
checkpoint kept), backward, clip (pre-clip norm logged), optimizer and scheduler step, EMA, logging, checkpoints every
``--checkpointing_steps`` (synchronous, atomic) and validation images every ``--validation_steps``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from t2i_distill.training.args import parse_args
from t2i_distill.training.model_check import MODEL_KINDS, _model_flags, check_models

logger = logging.getLogger("t2i_distill.train")

__all__ = ["DistillationPair", "NonFiniteLossError", "main", "train"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss; the last good checkpoint is kept."""


class DistillationPair(nn.Module):
    """Student (trained) + teacher (frozen, held outside the module tree): ``forward(batch, step)`` → ``(loss, logs)``.

    ``null_condition`` (MeanFlow's prompt-dropout embedding of " ") is held as non-persistent buffers so it moves with
    the module and never enters a checkpoint.
    """

    def __init__(self, method: str, student: nn.Module, teacher: nn.Module, loss_config, jvp_mode: str,
                 null_condition: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.method, self.loss_config, self.jvp_mode = method, loss_config, jvp_mode
        self.student = student
        # The frozen teacher is deliberately not a submodule: no backend wraps, casts, shards or broadcasts it, and no
        # checkpoint stores its (unchanging) weights. Every rank loads it identically from the teacher folder.
        self._teacher = (teacher.requires_grad_(False).eval(),)
        if method == "meanflow":
            if null_condition is None:
                raise ValueError("`null_condition`: MeanFlow needs the embedding of the empty prompt ' '")
            self.register_buffer("null_prompt_embeds", null_condition[0], persistent=False)
            self.register_buffer("null_pooled_prompt_embeds", null_condition[1], persistent=False)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, batch: dict, step: int, draws=None, outputs_only: bool = False, phases=None):
        """``(loss, logs)`` of the method; ``phases`` is the losses' phase hook (``t2i-distill plan`` passes one)."""
        from t2i_distill import losses
        from t2i_distill.losses.common import no_phases

        phases = no_phases if phases is None else phases

        if outputs_only:  # the rescale gap: (student, teacher) velocities, through the backend's wrapper like a step
            from t2i_distill.losses.rescale import rescale_outputs

            return rescale_outputs(self.student, self.teacher, batch, draws)
        if self.method == "rescale":
            from t2i_distill.losses.rescale import rescale_loss

            return rescale_loss(self.student, self.teacher, batch, config=self.loss_config, draws=draws)
        if self.method == "scm":
            return losses.scm_loss(self.student, self.teacher, batch, step=step, config=self.loss_config,
                                   draws=draws, jvp_mode=self.jvp_mode, phases=phases)
        return losses.meanflow_loss(self.student, self.teacher, batch, config=self.loss_config,
                                    null_condition=(self.null_prompt_embeds, self.null_pooled_prompt_embeds),
                                    draws=draws, jvp_mode=self.jvp_mode, phases=phases)


# -- building blocks ----------------------------------------------------------------------------------------------
def loss_config_from_args(args):
    """The method's loss config from the flags: every config field takes the flag of the same name (lists become
    tuples); MeanFlow's ``tangent`` is ``--meanflow_tangent``."""
    from dataclasses import fields

    from t2i_distill.losses import MeanFlowConfig, SCMConfig
    from t2i_distill.losses.rescale import RescaleConfig

    cls = {"scm": SCMConfig, "meanflow": MeanFlowConfig, "rescale": RescaleConfig}[args.method]
    renamed = {"tangent": "meanflow_tangent"}
    values = {}
    for field in fields(cls):
        flag = renamed.get(field.name, field.name)
        if hasattr(args, flag):
            value = getattr(args, flag)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def resolve_backend(args) -> str:
    if args.backend != "auto":
        return args.backend
    if args.deepspeed_config:
        return "deepspeed"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def load_models(args, device: torch.device, teacher_dtype: torch.dtype):
    """(student, teacher) as the method needs them: sCM TrigFlow pair; MeanFlow dual-timestep student + flow teacher;
    rescale: a ×1 copy of the stock ×1000 teacher (embedders initialised by ``--embedder_init``)."""
    from t2i_distill.models import load_student

    student_kind, teacher_kind = MODEL_KINDS[args.method]
    common = {"rescaled_checkpoint": args.rescaled_checkpoint_path, "time_scale": args.time_scale,
              "time_embedding_fp32": args.time_embedding_fp32, "accepted_kinds": ("flow",),
              "flags": _model_flags(args), "revision": args.revision, "variant": args.variant,
              "cache_dir": args.cache_dir}
    student, _ = load_student(args.pretrained_model_name_or_path, kind=student_kind, **common)  # logs its report
    teacher, _ = load_student(args.pretrained_model_name_or_path, kind=teacher_kind, torch_dtype=teacher_dtype,
                              **common)
    if args.method == "rescale":
        from t2i_distill.training.rescale import frequency_map_init

        teacher_scale = float(student.config.time_scale)
        # The student is the teacher's copy re-declared ×1 (the sinusoid then takes t, not 1000·t).
        student.register_to_config(time_scale=1.0, time_embedding_fp32=False)
        if args.embedder_init == "frequency_map":
            changed = frequency_map_init(student, teacher_scale=teacher_scale, student_scale=1.0)
            logger.info("student embedders remapped ×%g → ×1: %s", teacher_scale, ", ".join(changed))
    elif student.config.time_scale != 1.0:
        logger.warning("training on weights at ×%g with the time embeddings in %s; the paper found sCM at ×1000 "
                       "unstable (§4.2.1): `t2i-distill rescale` makes the ×1 teacher", student.config.time_scale,
                       "float32" if student.config.time_embedding_fp32 else "the model dtype")
    student.train()
    return student.to(device), teacher.to(device).eval().requires_grad_(False)


def prepare_student(student, args) -> None:
    """The LoRA adapter (``--lora_rank``), then kernels for the JVP modes that use them; gradient checkpointing only
    when asked (never behind one's back)."""
    from t2i_distill import apply_kernels_to_flux

    if getattr(args, "lora_rank", 0):  # before the kernels: patching swaps block classes, the linears stay peft's
        from t2i_distill.training.lora import apply_lora

        heads = apply_lora(student, args.lora_rank, args.lora_alpha, args.lora_target_modules, args.lora_dropout)
        trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
        total = sum(p.numel() for p in student.parameters())
        logger.info("LoRA student: rank %d, alpha %g; %d of %d parameters trained (%.2f%%), in full: %s",
                    args.lora_rank, args.lora_alpha or args.lora_rank, trained, total, 100 * trained / total,
                    ", ".join(heads) or "none")
    # fd runs plain forwards: on the kernels where they are fast (CUDA), on diffusers' attention on a CPU.
    if args.jvp in ("dual", "func") or (args.jvp == "fd" and torch.cuda.is_available() and not args.cpu):
        apply_kernels_to_flux(student)
    if args.gradient_checkpointing:  # every mode, the fused dual pass included (each block recomputed)
        student.enable_gradient_checkpointing()


def build_optimizer_factory(args):
    from t2i_distill.training import optimizer_factory

    extra = {}
    if args.optimizer == "prodigy":
        extra = {"beta3": args.prodigy_beta3, "decouple": args.prodigy_decouple,
                 "use_bias_correction": args.prodigy_use_bias_correction,
                 "safeguard_warmup": args.prodigy_safeguard_warmup}
    return optimizer_factory(args.optimizer, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, weight_decay=args.adam_weight_decay, **extra)


def build_scheduler_factory(args, max_train_steps: int):
    from t2i_distill.training import lr_scheduler_factory

    # One scheduler step per optimizer update on every backend (the reference multiplied the step counts by the
    # number of processes because accelerate stepped its scheduler once per process).
    return lr_scheduler_factory(args.lr_scheduler, warmup_steps=args.lr_warmup_steps, total_steps=max_train_steps,
                                num_cycles=args.lr_num_cycles, power=args.lr_power)


class Trackers:
    """TensorBoard (default) and/or W&B on the main rank; scalars and images. No-ops elsewhere."""

    def __init__(self, args, is_main: bool, config: dict):
        self.writers = []
        if not is_main or args.report_to == "none":
            return
        if args.report_to in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(("tensorboard", SummaryWriter(str(Path(args.output_dir) / args.logging_dir))))
        if args.report_to in ("wandb", "all"):
            try:
                import wandb
            except ImportError as error:
                raise ValueError("--report_to wandb needs the wandb package (pip install wandb)") from error
            run = wandb.init(project=args.tracker_project_name or f"t2i-distill-{args.method}", config=config,
                             dir=str(Path(args.output_dir)))
            self.writers.append(("wandb", run))

    def log(self, scalars: dict, step: int) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for key, value in scalars.items():
                    writer.add_scalar(key, value, step)
            else:
                writer.log(scalars, step=step)

    def log_record(self, record: dict) -> None:
        """The run record: every flag as TensorBoard hparams (scalars as they are, the rest as text) and as one text."""
        import json

        for kind, writer in self.writers:
            if kind == "tensorboard":
                hparams = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str))
                           for k, v in record["flags"].items()}
                writer.add_hparams(hparams, {"hparams/recorded": 1.0}, run_name=".")
                writer.add_text("run/record", "```json\n" + json.dumps(record, indent=2, default=str) + "\n```", 0)
            else:
                writer.config.update({"run_record": record}, allow_val_change=True)

    def log_images(self, tag: str, image, step: int) -> None:
        """``image``: a PIL image (a grid)."""
        import numpy as np

        for kind, writer in self.writers:
            if kind == "tensorboard":
                writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
            else:
                import wandb

                writer.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            writer.close() if kind == "tensorboard" else writer.finish()


def steps_per_epoch(data, args, world_size: int) -> int | None:
    try:
        samples = len(data.dataset) if hasattr(data, "dataset") else len(data)
    except TypeError:
        return None
    per_step = args.train_batch_size * world_size * args.gradient_accumulation_steps
    return max(1, samples // per_step)


# -- the loop -----------------------------------------------------------------------------------------------------
def train(args, on_finish=None) -> dict:
    """Run a distillation from parsed ``args``; returns a summary (final step, counters, paths).

    ``on_finish(engine)``, when given, is called on every rank after the last step, before the engine is closed
    (tests use it to read each rank's weights).
    """
    from t2i_distill.data import DataConfig, TrainData, encode_batch, load_cache_manifest, load_empty_prompt
    from t2i_distill.training import EMA, CheckpointManager, EngineConfig, build_engine, check_writable
    from t2i_distill.training.engine import seed_everything
    from t2i_distill.training.preflight import resolve_jvp

    if getattr(args, "overwrite_output_dir", False) and int(os.environ.get("RANK", "0")) == 0:
        from t2i_distill.training.run_record import existing_run_outputs, remove_run_outputs

        earlier = existing_run_outputs(args.output_dir)
        if earlier:
            logger.warning("--overwrite_output_dir: removing the earlier run's %s", ", ".join(p.name for p in earlier))
            remove_run_outputs(earlier)
    check_writable(args.output_dir, min_free_bytes=int(args.min_free_disk_gb * 2**30))
    check_models(args)  # flags vs weights (kind, keys, time scale) before any data or weights load
    backend = resolve_backend(args)
    cuda = torch.cuda.is_available() and not args.cpu
    for note in [*getattr(args, "preflight_notes", []), resolve_jvp(args, cuda)]:  # resolve_jvp: API callers
        if note:
            quiet = note.startswith("--jvp auto") or "(from the DeepSpeed JSON" in note
            (logger.info if quiet else logger.warning)("%s", note)
    mixed = args.mixed_precision or ("bf16" if cuda else "no")
    if args.allow_tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    engine_cfg = EngineConfig(backend=backend, mixed_precision=mixed,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              max_grad_norm=args.max_grad_norm or None, deepspeed_config=args.deepspeed_config,
                              micro_batch_size=args.train_batch_size, seed=0 if args.seed is None else args.seed,
                              cpu=not cuda)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    seed = 0 if args.seed is None else args.seed
    # Each rank its own noise stream (seed + rank); the data order is sharded from `seed` alone.
    seed_everything(seed + rank)

    # Data first: a cache that does not match the model fails before any weight is loaded.
    data = TrainData(
        DataConfig(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                   dataset_split=args.dataset_split, train_data_dir=args.train_data_dir,
                   image_column=args.image_column, caption_column=args.caption_column,
                   max_train_samples=args.max_train_samples, resolution=args.resolution, streaming=args.streaming,
                   cached_dataset=args.cached_dataset, dataloader_num_workers=args.dataloader_num_workers),
        batch_size=args.train_batch_size, seed=seed, rank=rank, world_size=world,
    )
    text_encoders = vae = None
    teacher_dtype = torch.bfloat16 if mixed == "bf16" else torch.float32
    if args.cached_dataset:
        manifest = load_cache_manifest(args.cached_dataset)
        manifest.check_matches(pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                               resolution=args.resolution, max_sequence_length=args.max_sequence_length)
        null_condition = load_empty_prompt(args.cached_dataset) if args.method == "meanflow" else None
    else:
        from diffusers import AutoencoderKL

        from t2i_distill.conditioning import TextEncoders

        text_encoders = TextEncoders.from_pretrained(args.pretrained_model_name_or_path, dtype=teacher_dtype,
                                                     device=device, revision=args.revision, variant=args.variant)
        vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae",
                                            dtype=teacher_dtype, revision=args.revision).to(device)
        vae.requires_grad_(False).eval()
        null = text_encoders.encode([" "], args.max_sequence_length) if args.method == "meanflow" else None
        null_condition = None if null is None else (null.prompt_embeds, null.pooled_prompt_embeds)

    per_epoch = steps_per_epoch(data, args, world)
    if args.max_train_steps is None:
        if per_epoch is None:
            raise ValueError("--max_train_steps is required with a dataset of unknown length (e.g. --streaming)")
        args.max_train_steps = args.num_train_epochs * per_epoch
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * world

    student, teacher = load_models(args, device, teacher_dtype)
    prepare_student(student, args)
    pair = DistillationPair(args.method, student, teacher, loss_config_from_args(args), args.jvp,
                            None if null_condition is None else tuple(t.to(device) for t in null_condition))
    engine = build_engine(engine_cfg, model=pair, optimizer_factory=build_optimizer_factory(args),
                          lr_scheduler_factory=build_scheduler_factory(args, args.max_train_steps))
    # Room for two checkpoints (the new one is complete before the old one is pruned), before the first step.
    check_writable(args.output_dir, min_free_bytes=int(args.min_free_disk_gb * 2**30)
                   + 2 * engine.checkpoint_bytes_estimate())
    ema = EMA(engine.unwrapped.student, args.ema_decay) if args.ema_decay else None
    from t2i_distill.training.exports import clean_stale_temporaries, export_step, missing_exports

    checkpoints = CheckpointManager(args.output_dir, total_limit=args.checkpoints_total_limit,
                                    identity={"method": args.method, "lora": _lora_identity(args)})
    if engine.is_main:
        for stale in clean_stale_temporaries(args.output_dir):
            logger.info("removed %s, left by an interrupted export", stale)
    global_step, counters = 0, {"nonfinite_skipped": 0}
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":  # the newest that verifies; newer failing ones are named
            path = checkpoints.latest_verified(log=logger.warning)
        else:
            path = checkpoints.resolve(args.resume_from_checkpoint)  # verified, or refused naming the file
        if path is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s; starting from step 0",
                           args.output_dir)
        else:
            extra = checkpoints.load(path, engine, verify=False)
            global_step = int(extra["trainer"]["global_step"])
            counters = dict(extra["trainer"].get("counters", counters))
            data.load_state_dict(extra["sampler"])
            if ema is not None and extra.get("ema") is not None:
                ema.load_state_dict(extra["ema"])
            logger.info("resumed from %s at step %d", path, global_step)
            missing = missing_exports(args, global_step)
            if missing:  # e.g. a disk that filled up while exporting: write them again
                logger.warning("step %d's exports are missing (%s); writing them from the checkpoint", global_step,
                               ", ".join(p.name for p in missing))
                export_step(args, engine, ema, global_step, MODEL_KINDS)

    trackers = Trackers(args, engine.is_main, {k: v for k, v in vars(args).items()
                                               if isinstance(v, (int, float, str, bool))})
    if engine.is_main:
        from t2i_distill.training.run_record import run_record, write_run_record

        record = run_record(args, backend=backend, world_size=world, mixed_precision=mixed, jvp=args.jvp,
                            resumed_at_step=global_step if args.resume_from_checkpoint else None)
        logger.info("run record: %s", write_run_record(args.output_dir, record))
        trackers.log_record(record)
    validator = gap = None
    if args.method == "rescale":
        from t2i_distill.training.rescale import RescaleGap, record_gap

        gap = RescaleGap(_gap_batches(args, data, text_encoders, vae, seed), buckets=args.rescale_gap_buckets)

        def measure_gap(step: int, when: str) -> None:
            # Through engine.module (FSDP2 gathers its root parameters in the wrapper's forward), on every rank.
            result = gap.measure(lambda batch, draws: engine.module(batch, step, draws=draws, outputs_only=True),
                                 engine.unwrapped.student, autocast=engine.autocast)
            if engine.is_main:
                record_gap(args.output_dir, step, result, when)
                trackers.log({"rescale_gap/overall": result["overall"],
                              **{f"rescale_gap/t_{k}": v for k, v in result["buckets"].items()}}, step)

        measure_gap(global_step, "start")
    elif args.validation_prompts and engine.is_main:
        from t2i_distill.training.validation import Validator

        validator = Validator(args, text_encoders, vae, device)

    def save(step: int) -> Path:
        extra = {"trainer": {"global_step": step, "counters": counters}, "sampler": data.state_dict()}
        # The EMA per rank: under FSDP2 each rank's shadow holds its own shards.
        per_rank = {} if ema is None else {"ema": ema.state_dict()}
        # The exports first: once the checkpoint is visible, its exports exist (training/exports.py).
        export_step(args, engine, ema, step, MODEL_KINDS)
        return checkpoints.save(step, engine, extra=extra, per_rank_extra=per_rank)

    def skip_nonfinite(what: str, in_a_row: int) -> int:
        counters["nonfinite_skipped"] += 1
        in_a_row += 1
        logger.warning("step %d: non-finite %s on some rank; skipped (%d in a row, %d in total)", global_step, what,
                       in_a_row, counters["nonfinite_skipped"])
        if in_a_row >= args.max_nonfinite_steps:
            last = checkpoints.latest()
            raise NonFiniteLossError(
                f"{in_a_row} consecutive steps had a NaN/inf {what} (--max_nonfinite_steps {args.max_nonfinite_steps});"
                f" stopping. The last good checkpoint is {last if last else 'none (none was written yet)'}; lower "
                "--learning_rate or check the data")
        return in_a_row

    progress = _progress(engine.is_main, global_step, args.max_train_steps)
    batches, consecutive_bad, step_start = iter(data), 0, time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while global_step < args.max_train_steps:
            batch = next(batches)
            if text_encoders is not None:
                batch = encode_batch(batch, text_encoders, vae, max_sequence_length=args.max_sequence_length)
            batch = engine.cast_inputs(batch)
            with engine.autocast():
                loss, logs = engine.module(batch, global_step)
            # A vote before backward: every rank skips the same micro-step (no backward, no collective mismatch).
            if not engine.all_ranks_ok(bool(torch.isfinite(loss.detach()).all())):
                consecutive_bad = skip_nonfinite("loss", consecutive_bad)
                continue
            engine.backward(loss)
            report = engine.step()
            if report is None:
                continue
            if report.skipped:  # a non-finite gradient norm: the engine did not update the weights
                consecutive_bad = skip_nonfinite("gradient norm", consecutive_bad)
                continue
            consecutive_bad = 0
            global_step += 1
            if ema is not None:
                ema.update(engine.unwrapped.student)
            elapsed = time.perf_counter() - step_start
            step_start = time.perf_counter()
            scalars = {k: float(v) for k, v in logs.items()}
            scalars.update({"grad_norm": report.grad_norm, "grad_clipped": float(report.clipped), "lr": report.lr,
                            "step_time_s": elapsed,
                            "samples_per_s": args.train_batch_size * args.gradient_accumulation_steps * world
                            / max(elapsed, 1e-9)})
            if cuda:
                scalars["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            trackers.log(scalars, global_step)
            progress.update(1)
            # The number that moves: MeanFlow's adaptive weighting pins `loss` near 1, its mean squared error moves.
            shown = {"meanflow": "loss_mean_ref", "rescale": "rel_l2"}.get(args.method, "loss")
            progress.set_postfix({shown: f"{scalars.get(shown, float(loss.detach())):.4g}",
                                  "samples_s": f"{scalars['samples_per_s']:.2f}"})
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save(global_step)
            if validator is not None and global_step % args.validation_steps == 0:
                for tag, grid in validator.run(engine.unwrapped.student, ema, global_step).items():
                    trackers.log_images(tag, grid, global_step)
            if gap is not None and global_step % args.validation_steps == 0 and global_step != args.max_train_steps:
                measure_gap(global_step, "validation")
            engine.barrier()
        if gap is not None:
            measure_gap(global_step, "end")
        if on_finish is not None:
            on_finish(engine)
    finally:
        progress.close()
        trackers.close()
        engine.close()
    return {"global_step": global_step, "counters": counters, "output_dir": str(args.output_dir),
            "latest_checkpoint": str(checkpoints.latest())}


def _gap_batches(args, data, text_encoders, vae, seed: int) -> list[dict]:
    """The rescale gap's fixed evaluation batches: the first ``--rescale_gap_batches`` of the data in an order of its
    own (seed + 7919, one process), encoded like training batches; every rank builds the same ones."""
    from t2i_distill.data import TrainData, encode_batch

    order = TrainData(data.cfg, batch_size=args.train_batch_size, seed=seed + 7919, rank=0, world_size=1)
    batches = []
    # Own RNG (the VAE samples its posterior): the training stream must not depend on whether this ran, or a
    # resumed run (which builds these again) would draw differently from an uninterrupted one.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and not args.cpu else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 7919)
        for batch in order:
            if text_encoders is not None:
                batch = encode_batch(batch, text_encoders, vae, max_sequence_length=args.max_sequence_length)
            batches.append({k: batch[k] for k in ("latents", "prompt_embeds", "pooled_prompt_embeds")})
            if len(batches) == args.rescale_gap_batches:
                break
    return batches


def _lora_identity(args) -> str:
    """The adapter a checkpoint's model holds, recorded in its manifest: a resume with other LoRA flags is refused by
    name instead of failing on the state dict's keys."""
    if not getattr(args, "lora_rank", 0):
        return "off (full fine-tuning)"
    from t2i_distill.training.lora import DEFAULT_LORA_TARGETS

    targets = args.lora_target_modules or DEFAULT_LORA_TARGETS
    return (f"rank {args.lora_rank}, alpha {args.lora_alpha or args.lora_rank:g}, dropout {args.lora_dropout:g}, "
            f"targets {','.join(sorted(targets))}")


def _progress(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="steps", dynamic_ncols=True)


def _record_failure(error: BaseException) -> None:
    """Under ``scripts/train.sh`` (``T2I_ERROR_DIR`` set): this rank's error, first line plain, then the traceback,
    so the launcher can print the first failure once, unwrapped, after torchrun's banner."""
    import traceback

    folder = os.environ.get("T2I_ERROR_DIR")
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    text = f"rank {rank}: {type(error).__name__}: {error}\n\n" + "".join(traceback.format_exception(error))
    try:
        Path(folder, f"rank{int(rank):05d}.txt").write_text(text, encoding="utf-8")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``t2i-distill train scm|meanflow [flags]``."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("scm", "meanflow", "rescale"):
        print("usage: t2i-distill train {scm,meanflow} [flags]   (t2i-distill train scm --help lists the flags)")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every refusal that flags, files and installed packages decide, at once, before any data or weights load.
    args = parse_args(argv[0], argv[1:], check_files=True)
    try:
        summary = train(args)
    except Exception as error:
        _record_failure(error)
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finished at step {summary['global_step']}; checkpoints in {summary['output_dir']} "
              f"(latest {summary['latest_checkpoint']}); non-finite steps skipped: "
              f"{summary['counters']['nonfinite_skipped']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
