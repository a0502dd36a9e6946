"""The student exports of a checkpointed step, as part of that step's durable state.

A step's exports (``transformer_<step>.safetensors``; with ``--save_pt`` the ``.pt``; with an EMA its
``_ema.safetensors``; with ``--export_layout reference`` ``ckpts/transformer_<step>.pt``; for ``rescale``'s last step
the ×1 folder and ``.pt``; for a LoRA student ``adapter_<step>.safetensors`` and, with the EMA exported,
``adapter_<step>_ema.safetensors``, its transformer exports holding the merged weights) are written *before* the
step's checkpoint becomes visible, each atomically (temporary name, fsync, rename). So a crash before the checkpoint's
rename redoes the step and its exports; a crash after it finds them written. A checkpoint whose exports are missing
anyway (a folder copied without them, a disk that filled up) has them written again on resume, from the restored
weights (:func:`missing_exports`).
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["clean_stale_temporaries", "export_step", "expected_exports", "missing_exports"]

logger = logging.getLogger("t2i_distill.train")


def expected_exports(args, step: int) -> list[Path]:
    out = Path(args.output_dir)
    files = [out / f"transformer_{step}.safetensors"]
    if args.save_pt:
        files.append(out / f"transformer_{step}.pt")
    if getattr(args, "ema_decay", None) and getattr(args, "export_ema", None) is not False:
        files.append(out / f"transformer_{step}_ema.safetensors")
    if getattr(args, "export_layout", "ours") == "reference":
        files.append(out / "ckpts" / f"transformer_{step}.pt")
    if args.method == "rescale" and step == args.max_train_steps:
        files += [out / "rescaled" / "transformer" / "config.json", out / "rescaled_transformer.pt"]
    if getattr(args, "lora_rank", 0):  # a LoRA student's adapter beside each transformer export
        files.append(out / f"adapter_{step}.safetensors")
        if out / f"transformer_{step}_ema.safetensors" in files:
            files.append(out / f"adapter_{step}_ema.safetensors")
    return files


def missing_exports(args, step: int) -> list[Path]:
    return [path for path in expected_exports(args, step) if not path.is_file()]


def export_step(args, engine, ema, step: int, model_kinds: dict) -> None:
    """Write every export of ``step``; a collective (state gathering), files written by the main rank."""
    from t2i_distill.models.checkpoint_files import metadata_for
    from t2i_distill.training.checkpoint import export_student

    state = engine.state_dict_for_export()
    ema_state = None
    if ema is not None and getattr(args, "export_ema", None) is not False:  # default on with --ema_decay
        with ema.average_parameters(engine.unwrapped.student):  # swapped in on every rank (FSDP2 gathers)
            ema_state = engine.state_dict_for_export()
    if not engine.is_main:
        return
    out = Path(args.output_dir)
    core = engine.unwrapped.student
    metadata = metadata_for(model_kinds[args.method][0], core.config.time_scale)
    student_state = _student_state(state, core, out / f"adapter_{step}.safetensors", step, metadata)
    export_student(student_state, out, step, formats=("safetensors", "pt") if args.save_pt else ("safetensors",),
                   metadata=metadata)
    if ema_state is not None:
        ema_metadata = {**metadata, "t2i_distill.weights": f"ema (decay {args.ema_decay})"}
        ema_student = _student_state(ema_state, core, out / f"adapter_{step}_ema.safetensors", step, ema_metadata)
        export_student(ema_student, out / f"transformer_{step}_ema.safetensors", step, metadata=ema_metadata)
    if getattr(args, "export_layout", "ours") == "reference":  # where the reference's GenEval scripts read
        export_student(student_state, out / "ckpts", step, formats=("pt",), metadata=metadata)
    if args.method == "rescale" and step == args.max_train_steps:
        from t2i_distill.training.rescale import write_rescaled_outputs

        written = write_rescaled_outputs(student_state, dict(core.config), out, args.pretrained_model_name_or_path,
                                         step, revision=args.revision, cache_dir=args.cache_dir)
        logger.info("×1 teacher written: %s (pipeline folder) and %s (the reference's .pt)", written["folder"],
                    written["pt"])
    from t2i_distill.training.faults import crash_point

    crash_point("exported", step)


def _student_state(state: dict, core, adapter_path: Path, step: int, metadata: dict) -> dict:
    """The student's part of the engine's export state; for a LoRA student its adapter is written to
    ``adapter_path`` first and the merged weights returned (training/lora.py), so every other export is a plain
    student that loads strictly."""
    import json

    from t2i_distill.training.checkpoint import export_student
    from t2i_distill.training.lora import META_LORA, adapter_state_dict, is_lora, lora_settings, merged_state_dict

    student = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    if not is_lora(core):
        return student
    settings = lora_settings(core)
    export_student(adapter_state_dict(student, settings), adapter_path, step,
                   metadata={**metadata, META_LORA: json.dumps(settings, sort_keys=True)})
    return merged_state_dict(student, settings)


def clean_stale_temporaries(output_dir) -> list[Path]:
    """Remove what a killed export left (``.tmp-*`` files and folders beside the exports); returns them."""
    import shutil

    out = Path(output_dir)
    stale = []
    for folder in (out, out / "ckpts"):
        if not folder.is_dir():
            continue
        for path in folder.glob(".tmp-*"):
            if path.name.startswith(".tmp-checkpoint-"):
                continue  # the checkpoint manager's own, removed by its next save
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            stale.append(path)
    return stale
