"""The trainer's model checks, from configs and checkpoint headers only (nothing loads): what ``parse_args`` runs
before anything loads, and ``train`` again for API callers. Kept apart from the trainer so that the flag parser can
use them without importing it (the import graph has no cycles)."""

from __future__ import annotations

import logging

__all__ = ["MODEL_KINDS", "check_models"]

logger = logging.getLogger("t2i_distill.train")

#: The models of each method: (student kind, teacher kind).
MODEL_KINDS = {"scm": ("trigflow", "trigflow"), "meanflow": ("meanflow", "flow"), "rescale": ("flow", "flow")}


def _model_flags(args) -> dict[str, str]:
    kind = "`t2i-distill rescale`" if args.method == "rescale" else f"`train {args.method}`"
    return {"pretrained": "--pretrained_model_name_or_path", "checkpoint": "--rescaled_checkpoint_path",
            "time_scale": "--time_scale", "kind": f"{kind}'s teacher"}


def check_models(args) -> float:
    """Every model refusal, from configs and checkpoint headers only, before any data or weights load; returns the
    teacher's time scale."""
    from t2i_distill.models.loading import check_load
    from t2i_distill.models.time_scale import STOCK_TIME_SCALE

    student_kind, teacher_kind = MODEL_KINDS[args.method]
    common = {"checkpoint": args.rescaled_checkpoint_path, "accepted_kinds": ("flow",), "time_scale": args.time_scale,
              "revision": args.revision, "cache_dir": args.cache_dir, "flags": _model_flags(args)}
    check = check_load(args.pretrained_model_name_or_path, kind=teacher_kind, **common)
    if args.method == "rescale":
        if check.time_scale != STOCK_TIME_SCALE:
            from t2i_distill.errors import ConfigurationError

            raise ConfigurationError(f"--pretrained_model_name_or_path: rescale distils the stock ×1000 FLUX "
                                     f"transformer into a ×1 copy, but {check.time_scale_why}; it is already "
                                     f"×{check.time_scale:g}")
        return check.time_scale
    check_load(args.pretrained_model_name_or_path, kind=student_kind, **common)
    return check.time_scale
