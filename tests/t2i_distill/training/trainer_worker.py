"""Run by ``torchrun`` from ``test_trainer.py``: one trainer process; afterwards each rank writes its full student
weights (``rank<r>_state.pt``, gathered from shards under FSDP2) and its summary, so the test can compare ranks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def full_student_state(engine) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in engine.unwrapped.student.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor shard: gather (a collective, same order on every rank)
            tensor = tensor.full_tensor()
        state[name] = tensor.detach().to("cpu", torch.float32).clone()
    return state


def main() -> None:
    from t2i_distill.training.args import parse_args
    from t2i_distill.training.trainer import train

    method, argv = sys.argv[1], sys.argv[2:]
    args = parse_args(method, argv)
    rank = int(os.environ["RANK"])
    out = Path(args.output_dir)
    captured = {}
    summary = train(args, on_finish=lambda engine: captured.update(full_student_state(engine)))
    torch.save(captured, out / f"rank{rank}_state.pt")
    (out / f"rank{rank}_summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
