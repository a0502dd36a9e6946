"""One whole training step of the trainer, on fake tensors under a :class:`~.ledger.MemoryLedger`.

The step is the trainer's, through the same functions: models built from the transformer config by the trainer's
model kinds (:data:`~t2i_distill.training.model_check.MODEL_KINDS`), prepared by
:func:`~t2i_distill.training.trainer.prepare_student` (kernels, gradient checkpointing), the optimizer from
:func:`~t2i_distill.training.optim.optimizer_factory`, and the loss functions themselves with their phase hooks:
teacher forward, the JVP of the chosen mode (``jvp``, or the fused ``dual`` pass), the grad forward (``student``),
the ``loss``, then ``backward``, and the ``optimizer`` step with gradient clipping (states are created on the first
step, as on a GPU). Mixed precision per backend follows :mod:`t2i_distill.training.engine`:

* ``single``/``ddp``: fp32 parameters, ``torch.autocast(bf16)`` around the loss (autocast's cast-weight cache holds a
  bf16 copy of every weight used, for the whole autocast region, and is counted);
* ``fsdp2``: fp32 sharded parameters, bf16 compute weights gathered per block (modelled in :mod:`.sharding`);
* ``deepspeed``: bf16 module weights, bf16 inputs, no autocast; fp32 masters and states partitioned by ZeRO.

What is not run: the data loader, text encoders and VAE (with ``--cached_dataset`` none are on the GPU; otherwise
their bf16 weights are added by :mod:`.plan`), collectives (their buffers are modelled in :mod:`.sharding`).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from unittest import mock

import torch

from t2i_distill.planning.fake_gpu import emulate_cuda, fake_tensors, materialise
from t2i_distill.planning.ledger import MemoryLedger

__all__ = ["StepSetting", "StepResult", "build_models", "run_step"]

LATENT_CHANNELS = 16  # FLUX's VAE latent channels; the transformer sees 2×2 patches of them (in_channels = 64)
VAE_DOWNSCALE = 8


@dataclass(frozen=True)
class StepSetting:
    """What decides a step's memory and FLOPs (the training flags of the same names)."""

    method: str = "scm"
    jvp: str = "dual"
    resolution: int = 1024
    train_batch_size: int = 1
    max_sequence_length: int = 512
    gradient_checkpointing: bool = False
    mixed_precision: str = "bf16"
    weights_dtype: str = "fp32"  # "bf16" under DeepSpeed's bf16 (the module's weights are bf16 there)
    optimizer: str = "adamw"
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_target_modules: tuple[str, ...] | None = None
    cuda: bool = True  # emulate a CUDA run (False: a CPU run, what the tests compare with real CPU steps)
    fsdp2_world: int = 0  # > 0: shard the student with the engine's fully_shard over this many fake ranks


@dataclass
class StepResult:
    """The ledger after one step, and the parameter counts it needs to be scaled to other backends."""

    ledger: MemoryLedger
    student_params: int
    trainable_params: int
    teacher_params: int
    teacher_bytes: int
    optimizer_state_bytes: int = 0  # what the optimizer keeps between steps (AdamW: exp_avg, exp_avg_sq), this rank
    notes: list[str] = field(default_factory=list)
    phase_order: list[str] = field(default_factory=list)


def _real(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Real random weights (tests compare a fake step with this real one)."""
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model


def build_models(config: dict, setting: StepSetting, device: torch.device, fake: bool = True):
    """(student, teacher) on fake ``device``: the trainer's kinds for ``setting.method``, the student in fp32 (the
    masters; bf16 under DeepSpeed's bf16), the frozen teacher in bf16 with mixed precision."""
    from t2i_distill.models.loading import KINDS
    from t2i_distill.training.model_check import MODEL_KINDS

    student_kind, teacher_kind = MODEL_KINDS[setting.method]
    bf16 = setting.mixed_precision == "bf16"
    built = []
    for kind, dtype in ((student_kind, torch.bfloat16 if setting.weights_dtype == "bf16" else torch.float32),
                        (teacher_kind, torch.bfloat16 if bf16 else torch.float32)):
        cls, overrides = KINDS[kind]
        with torch.device("meta"):
            model = cls.from_config({**config, **overrides})
        built.append(materialise(model, device, dtype) if fake else _real(model, device, dtype))
    student, teacher = built
    return student.train(), teacher.eval().requires_grad_(False)


def _batch(config: dict, setting: StepSetting, device: torch.device, dtype: torch.dtype) -> dict:
    side = setting.resolution // VAE_DOWNSCALE
    b = setting.train_batch_size
    return {"latents": torch.randn(b, config["in_channels"] // 4, side, side, device=device, dtype=dtype),
            "prompt_embeds": torch.randn(b, setting.max_sequence_length, config["joint_attention_dim"], device=device,
                                         dtype=dtype),
            "pooled_prompt_embeds": torch.randn(b, config["pooled_projection_dim"], device=device, dtype=dtype)}


@contextmanager
def _whole_batch_in_cfg_subset():
    """MeanFlow's CFG subset is data-dependent; fake tensors have no values. Its worst case for memory: all in C."""
    from t2i_distill.losses import meanflow

    def every_sample(mask: torch.Tensor):
        n = mask.shape[0]
        return torch.arange(n, device=mask.device), torch.arange(0, device=mask.device)

    with mock.patch.object(meanflow, "cfg_groups", every_sample):
        yield


@contextmanager
def _fake_process_group(world: int):
    """A ``world``-rank process group in this one process (torch's "fake" backend: collectives move no data) and its
    1-d CPU mesh, created before fake tensors (a mesh reads real values), handed to ``fully_shard`` as its default."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp._fully_shard import _fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan: a process group is already initialised in this process; run plan on its own")
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world,))
        with mock.patch.object(_fully_shard, "_init_default_mesh", lambda *args, **kwargs: mesh):
            yield
    finally:
        dist.destroy_process_group()


def _shard_fsdp2(pair, setting: StepSetting, config: dict, device: torch.device, dtype: torch.dtype) -> None:
    """The engine's FSDP2 sharding of the pair, then one tiny forward outside any transform (not counted).

    Why the forward: FSDP2 creates each block's unsharded ``nn.Parameter`` on its first all-gather, and creating a
    parameter inside ``torch.func.jvp`` (the first student call of the ``func``/``reference`` modes) is refused by
    functorch. A 1-token step of the pair in the ``fd`` mode (plain forwards), without grad, creates them first."""
    from t2i_distill.training.engine import EngineConfig, _shard_fsdp2

    _shard_fsdp2(pair, EngineConfig(backend="fsdp2", mixed_precision=setting.mixed_precision))
    tiny = replace(setting, resolution=2 * VAE_DOWNSCALE, max_sequence_length=1, train_batch_size=1)
    mode, pair.jvp_mode = pair.jvp_mode, "fd"
    try:
        with torch.no_grad():
            pair(_batch(config, tiny, device, dtype), 0)
    finally:
        pair.jvp_mode = mode


@contextmanager
def _values_unchecked():
    """The draws' value checks (finite, angles in range) read values, which fake tensors lack; the draws come from
    the losses' own samplers here, so only their shapes are checked."""
    from t2i_distill.losses import draws

    def shapes_only(self, latents_shape):
        draws._check_noise(self.noise, latents_shape)

    with mock.patch.object(draws.SCMDraws, "validate", shapes_only), \
            mock.patch.object(draws.MeanFlowDraws, "validate", shapes_only):
        yield


def _pair(setting: StepSetting, student, teacher, null_condition):
    """The trainer's :class:`~t2i_distill.training.trainer.DistillationPair` (what the engine wraps and shards)."""
    from t2i_distill.losses import MeanFlowConfig, SCMConfig
    from t2i_distill.training.trainer import DistillationPair

    config = SCMConfig() if setting.method == "scm" else MeanFlowConfig()
    return DistillationPair(setting.method, student, teacher, config, setting.jvp, null_condition)


def run_step(config: dict, setting: StepSetting, fake: bool = True, device: str = "cpu") -> StepResult:
    """Build the models and run one training step on fake tensors; the ledger holds its bytes and FLOPs.

    ``config`` is the transformer's ``config.json`` as a dict. ``setting.cuda=False`` plans a CPU run (what the tests
    compare with a real CPU step). ``fake=False`` runs the same step on real tensors with random weights on
    ``device`` (``"cuda"``: ``bench/gpu_check.py`` then records ``torch.cuda.max_memory_allocated`` per phase)."""
    from types import SimpleNamespace

    from t2i_distill.training.optim import optimizer_factory
    from t2i_distill.training.trainer import prepare_student

    if setting.method not in ("scm", "meanflow"):
        raise ValueError(f"method: expected 'scm' or 'meanflow', got {setting.method!r}")
    ledger = MemoryLedger(cuda=setting.cuda)
    cuda = setting.cuda
    with ExitStack() as stack:
        if setting.fsdp2_world:
            stack.enter_context(_fake_process_group(setting.fsdp2_world))
        device = stack.enter_context(fake_tensors()) if fake else torch.device(device)
        ledger.measure_cuda = device.type == "cuda"
        stack.enter_context(_whole_batch_in_cfg_subset())
        stack.enter_context(_values_unchecked())
        student, teacher = build_models(config, setting, device, fake)
        if setting.lora_rank:
            from t2i_distill.training.lora import apply_lora

            apply_lora(student, setting.lora_rank, setting.lora_alpha, setting.lora_target_modules)
        with mock.patch("torch.cuda.is_available", lambda: cuda):  # prepare_student's "fd on CUDA" choice
            prepare_student(student, SimpleNamespace(jvp=setting.jvp, cpu=not cuda,
                                                     gradient_checkpointing=setting.gradient_checkpointing))
        if cuda and fake:
            stack.enter_context(emulate_cuda(student))
        input_dtype = torch.bfloat16 if setting.weights_dtype == "bf16" else torch.float32
        batch = _batch(config, setting, device, input_dtype)
        null = None
        if setting.method == "meanflow":
            null = (torch.randn(1, setting.max_sequence_length, config["joint_attention_dim"], device=device,
                                dtype=input_dtype),
                    torch.randn(1, config["pooled_projection_dim"], device=device, dtype=input_dtype))
        pair = _pair(setting, student, teacher, null)
        notes = []
        if setting.fsdp2_world:  # the engine's own sharding of the pair: every block, then the root
            _shard_fsdp2(pair, setting, config, device, input_dtype)
            from torch.distributed.fsdp import FSDPModule

            units = sum(isinstance(m, FSDPModule) for m in pair.modules())
            if units == 1:
                notes.append("FSDP2 sharded the root only: the engine shards the blocks whose class (or a base "
                             "class) is FluxTransformerBlock or FluxSingleTransformerBlock, and this model has none, "
                             "so every pass all-gathers the whole student (bf16)")
        trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = optimizer_factory(setting.optimizer, lr=1e-6)(trainable)
        if cuda:  # torch picks the multi-tensor (foreach) step for CUDA tensors, and for CPU ones the per-tensor loop;
            for group in optimizer.param_groups:  # its full-size temporaries are part of a GPU step's peak
                group["foreach"] = True
        ledger.register(student.parameters(), "parameters")
        ledger.register(student.buffers(), "buffers")
        ledger.register(teacher.parameters(), "teacher")
        ledger.register(teacher.buffers(), "teacher")
        ledger.register(batch.values(), "activations")
        ledger.watch_gradients(trainable)
        # Engine.autocast: single/ddp only (FSDP2's policy and DeepSpeed's bf16 weights compute in bf16 themselves).
        autocast = (torch.autocast("cpu" if fake else device.type, dtype=torch.bfloat16)
                    if setting.mixed_precision == "bf16" and setting.weights_dtype == "fp32"
                    and not setting.fsdp2_world else nullcontext())
        order = ["teacher", "jvp", "student", "dual", "cfg", "loss", "backward", "optimizer"]
        try:
            with ledger:
                with autocast:
                    loss, _ = pair(batch, 10**6, phases=ledger.phase)
                with ledger.phase("backward"):
                    loss.backward()
                    del loss
                    ledger.label_gradients(trainable)
                with ledger.phase("optimizer"):
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
                    if not setting.fsdp2_world:  # FSDP2's step is counted by rule (plan.py): on fake DTensors the
                        optimizer.step()  # multi-tensor step materialises buffers a GPU step does not
                    optimizer.zero_grad(set_to_none=True)
        finally:
            ledger.remove_hooks()
        teacher_params = sum(p.numel() for p in teacher.parameters())
        total = sum(p.numel() for p in student.parameters())
        states = {id(t.untyped_storage()): t.untyped_storage().nbytes() for state in optimizer.state.values()
                  for key, t in state.items() if isinstance(t, torch.Tensor) and key != "step"}
        return StepResult(
            optimizer_state_bytes=sum(states.values()), notes=notes,
            ledger=ledger, student_params=total,
            trainable_params=sum(p.numel() for p in trainable), teacher_params=teacher_params,
            teacher_bytes=sum(p.numel() * p.element_size() for p in teacher.parameters()),
            phase_order=[name for name in order if name in ledger.phases])
