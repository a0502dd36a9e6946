"""Training scenarios run under every backend: in-process for ``single``, and as ``torchrun --nproc_per_node 2``
workers (``python -m torch.distributed.run ... engine_scenarios.py BACKEND OUT.json``) for ``ddp``, ``fsdp2`` and
``deepspeed``. Each scenario returns plain numbers/bools; rank 0 writes them to OUT.json for the test to assert.

Scenarios (all on CPU, fp32 unless stated, tiny models):

* ``resume``: 4 optimizer updates (2 micro-steps each) straight, vs 2 updates + save + a fresh model, engine and
  scrambled RNG + load + 2 updates. Data is drawn from the torch RNG, so a missed RNG restore changes the batches.
  Weights (gathered), this rank's optimizer state and the batches after the resume must be bit-identical.
* ``clip``: SGD with lr 1, so the update is exactly the (clipped) gradient: ‖Δθ‖ must equal min(norm, max).
* ``accumulation``: 2 micro-batches of 2 with accumulation == one batch of 4 (one SGD update).
* ``flux``: the tiny FLUX trained 4 steps in bf16 mixed precision with AdamW; loss finite, weights identical on all
  ranks, and the export round-trips through ``load_state_dict_file``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from t2i_distill.training import (
    EMA,
    CheckpointManager,
    EngineConfig,
    build_engine,
    export_student,
    lr_scheduler_factory,
)

MLP_IN, MLP_OUT = 8, 4


def build_mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(MLP_IN, 16), nn.Tanh(), nn.Linear(16, MLP_OUT))


def config(backend: str, **overrides) -> EngineConfig:
    settings = dict(backend=backend, cpu=True, seed=0, micro_batch_size=2)
    if backend == "deepspeed":
        settings["deepspeed_config"] = {"zero_optimization": {"stage": 2, "reduce_scatter": True,
                                                              "contiguous_gradients": True, "overlap_comm": True}}
    settings.update(overrides)
    return EngineConfig(**settings)


def full_parameters(engine) -> list[torch.Tensor]:
    """Every parameter as a whole fp32 CPU tensor (gathers FSDP2 shards: a collective there)."""
    out = []
    for param in engine.unwrapped.parameters():
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        out.append(tensor.detach().to("cpu", torch.float32).clone())
    return out


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def optimizer_digest(engine) -> str:
    """This rank's optimizer state (for DeepSpeed: its ZeRO partition of the base optimizer)."""
    optimizer = engine.optimizer
    tensors = []
    for state in optimizer.state.values():
        for key in sorted(state):
            value = state[key]
            if isinstance(value, torch.Tensor):
                tensors.append(value.to_local() if hasattr(value, "to_local") else value)
    return digest(tensors)


def all_equal(engine, value: str) -> bool:
    if engine.world_size == 1:
        return True
    gathered = [None] * engine.world_size
    torch.distributed.all_gather_object(gathered, value)
    return len(set(gathered)) == 1


def mlp_micro_step(engine, batch: int = 2) -> str:
    """One micro-step on a random batch from the torch RNG; returns the batch's digest."""
    x, y = torch.randn(batch, MLP_IN), torch.randn(batch, MLP_OUT)
    with engine.autocast():
        loss = nn.functional.mse_loss(engine.module(engine.cast_inputs(x)).float(), y)
    engine.backward(loss)
    engine.step()
    return digest([x, y])


def run_updates(engine, updates: int, ema: EMA | None = None) -> list[str]:
    seen = []
    for _ in range(updates * engine.config.gradient_accumulation_steps):
        final = engine.sync_gradients
        seen.append(mlp_micro_step(engine))
        if final and ema is not None:
            ema.update(engine.unwrapped)
    return seen


def scenario_resume(backend: str, workdir: Path) -> dict:
    def make_engine(model_seed: int):
        return build_engine(config(backend, gradient_accumulation_steps=2, max_grad_norm=0.5),
                            model=build_mlp(model_seed),
                            optimizer_factory=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
                            lr_scheduler_factory=lr_scheduler_factory("linear", warmup_steps=2, total_steps=8))

    straight = make_engine(0)
    ema_straight = EMA(straight.unwrapped, decay=0.9)
    seen_straight = run_updates(straight, 4, ema_straight)
    weights_straight, optim_straight = digest(full_parameters(straight)), optimizer_digest(straight)
    lr_straight = straight.optimizer.param_groups[0]["lr"]

    first = make_engine(0)
    ema_first = EMA(first.unwrapped, decay=0.9)
    run_updates(first, 2, ema_first)
    manager = CheckpointManager(workdir / "resume")
    # under FSDP2 the EMA holds this rank's shards: it goes in per_rank_extra
    path = manager.save(first.completed_steps, first, extra={"trainer": {"global_step": 2}},
                        per_rank_extra={"ema": ema_first.state_dict()})
    torch.manual_seed(12345)  # a different RNG state: only the checkpoint's can reproduce the straight run
    resumed = make_engine(7)  # and different initial weights: only the checkpoint's can
    extra = manager.load("latest", resumed)
    ema_resumed = EMA(resumed.unwrapped, decay=0.5)
    ema_resumed.load_state_dict(extra.pop("ema"))
    seen_resumed = run_updates(resumed, 2, ema_resumed)
    ema_equal = all(torch.equal(ema_resumed.shadow[k], ema_straight.shadow[k]) for k in ema_straight.shadow)
    return {
        "checkpoint_name": path.name,
        "extra_round_trip": extra == {"trainer": {"global_step": 2}},
        "ema_equal": ema_equal and all_equal(resumed, str(ema_equal)),
        "completed_steps": resumed.completed_steps,
        "weights_equal": digest(full_parameters(resumed)) == weights_straight,
        "optimizer_equal": all_equal(resumed, "x") and optimizer_digest(resumed) == optim_straight,
        "lr_equal": resumed.optimizer.param_groups[0]["lr"] == lr_straight,
        "batches_equal": seen_resumed == seen_straight[4:],
        "ranks_agree": all_equal(resumed, digest(full_parameters(resumed))),
        "weights_changed": digest(full_parameters(resumed)) != digest(full_parameters(make_engine(0))),
    }


def scenario_clip(backend: str) -> dict:
    out = {}
    for label, max_norm in (("clipped", 0.05), ("unclipped", None)):
        engine = build_engine(config(backend, max_grad_norm=max_norm), model=build_mlp(1),
                              optimizer_factory=lambda p: torch.optim.SGD(p, lr=1.0))
        rows = []
        for _ in range(2):
            before = full_parameters(engine)
            x, y = torch.randn(2, MLP_IN), torch.randn(2, MLP_OUT)
            loss = nn.functional.mse_loss(engine.module(engine.cast_inputs(x)).float(), y)
            engine.backward(loss)
            report = engine.step()
            after = full_parameters(engine)
            delta = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(after, before)))
            rows.append({"update_norm": float(delta), "grad_norm": report.grad_norm, "clipped": report.clipped})
        out[label] = rows
    return out


def scenario_accumulation(backend: str) -> dict:
    x, y = torch.randn(4, MLP_IN), torch.randn(4, MLP_OUT)
    results = []
    for gas, chunks in ((2, 2), (1, 1)):
        engine = build_engine(config(backend, gradient_accumulation_steps=gas, max_grad_norm=None,
                                     micro_batch_size=4 // chunks),
                              model=build_mlp(2), optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.5))
        syncs = []
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
            syncs.append(engine.sync_gradients)
            loss = nn.functional.mse_loss(engine.module(engine.cast_inputs(xc)).float(), yc)
            engine.backward(loss)
            engine.step()
        results.append((full_parameters(engine), syncs))
    (accumulated, syncs), (big, _) = results
    return {
        "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(accumulated, big)),
        "syncs": syncs,
        "changed": any(not torch.equal(a, b) for a, b in zip(big, full_parameters_of(build_mlp(2)))),
    }


def full_parameters_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def scenario_flux(backend: str, workdir: Path) -> dict:
    from t2i_distill.models import load_state_dict_file
    from t2i_distill.tiny import TinyFluxShape, build_tiny_flux, tiny_flux_inputs

    model = build_tiny_flux(seed=3).train()
    engine = build_engine(config(backend, mixed_precision="bf16", max_grad_norm=1.0, micro_batch_size=1),
                          model=model, optimizer_factory=lambda p: torch.optim.AdamW(p, lr=1e-3))
    shape = TinyFluxShape(batch=1, text_tokens=4, latent_h=4, latent_w=4)
    losses, norms = [], []
    for step in range(4):
        inputs = engine.cast_inputs(tiny_flux_inputs(model if backend != "deepspeed" else engine.unwrapped, shape,
                                                     seed=100 * step + engine.rank))
        target = torch.randn(1, shape.image_tokens, 16)
        with engine.autocast():
            sample = engine.module(**inputs, return_dict=False)[0]
        loss = nn.functional.mse_loss(sample.float(), target)
        engine.backward(loss)
        report = engine.step()
        losses.append(float(engine.all_reduce_mean(loss.detach().float())))
        norms.append(report.grad_norm)
    params = full_parameters(engine)
    exported = engine.state_dict_for_export()
    export_ok = None
    if engine.is_main:
        paths = export_student(exported, workdir / "export", step=4, formats=("safetensors", "pt"))
        names = [p.name for p in paths]
        loaded = [load_state_dict_file(p) for p in paths]
        reference = dict(zip([n for n, _ in engine.unwrapped.named_parameters()], params))
        export_ok = names == ["transformer_4.safetensors", "transformer_4.pt"] and all(
            sd.keys() == exported.keys() and all(torch.equal(sd[k].float(), reference[k]) for k in reference)
            for sd in loaded)
    return {
        "losses": losses,
        "grad_norms": norms,
        "ranks_agree": all_equal(engine, digest(params)),
        "export_ok": export_ok,
        "param_dtype": str(next(engine.unwrapped.parameters()).dtype),
    }


def scenario_failed_save(backend: str, workdir: Path) -> dict:
    """The last rank fails writing its RNG file during the second save: every rank must raise, and the first
    checkpoint must stay the latest, loadable, with no second or temporary folder left."""
    from t2i_distill.training import checkpoint

    def make_engine(seed: int):
        return build_engine(config(backend), model=build_mlp(seed),
                            optimizer_factory=lambda p: torch.optim.AdamW(p, lr=1e-2))

    engine = make_engine(0)
    run_updates(engine, 1)
    manager = CheckpointManager(workdir / "failed_save")
    manager.save(1, engine)
    saved = digest(full_parameters(engine))
    run_updates(engine, 1)
    real_save = checkpoint._torch_save
    failing_rank = engine.world_size - 1

    def failing_save(obj, path):
        if engine.rank == failing_rank and path.name.startswith("rng_state_"):
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    checkpoint._torch_save = failing_save
    try:
        manager.save(2, engine)
        raised = False
    except RuntimeError:
        raised = True
    finally:
        checkpoint._torch_save = real_save
    engine.barrier()
    names = sorted(p.name for p in manager.output_dir.iterdir())
    fresh = make_engine(5)
    manager.load("latest", fresh)
    return {"raised_everywhere": all_equal(engine, str(raised)) and raised, "folders": names,
            "previous_loads": digest(full_parameters(fresh)) == saved}


def run_all(backend: str, workdir: Path) -> dict:
    results = {"world_size": 1}
    results["resume"] = scenario_resume(backend, workdir)
    results["failed_save"] = scenario_failed_save(backend, workdir)
    results["clip"] = scenario_clip(backend)
    results["accumulation"] = scenario_accumulation(backend)
    results["flux"] = scenario_flux(backend, workdir)
    return results


def main(argv: list[str]) -> None:
    backend, out_path = argv[1], Path(argv[2])
    workdir = out_path.parent / "work"
    results = run_all(backend, workdir)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    results["world_size"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if rank == 0:
        out_path.write_text(json.dumps(results))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv)
