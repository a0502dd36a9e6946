"""The ledger against torch's own ``MemTracker``, where MemTracker can run: a plain training step of the tiny FLUX
student (forward, backward, AdamW) on real CPU tensors. (MemTracker hooks every module's inputs and outputs, which
fails under ``torch.func``'s JVP and on a frozen teacher, so the distillation steps are checked against a real CPU
run of the ledger itself in ``test_plan.py``.)"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from t2i_distill.planning.ledger import MemoryLedger
from t2i_distill.tiny import build_tiny_flux, tiny_flux_inputs


def _step(model, optimizer, inputs, phase=None) -> None:
    phase = phase or (lambda name: contextlib.nullcontext())
    with phase("forward"):
        loss = model(**inputs)[0].float().pow(2).mean()
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        optimizer.step()


def _steady_state():
    """After one step, so AdamW's states exist (they live through every later step)."""
    model = build_tiny_flux()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    inputs = {**tiny_flux_inputs(model), "return_dict": False}
    _step(model, optimizer, inputs)
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, inputs


def test_the_ledger_agrees_with_torch_memtracker_on_a_plain_training_step():
    model, optimizer, inputs = _steady_state()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        _step(model, optimizer, inputs)
    theirs = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]

    model, optimizer, inputs = _steady_state()
    ledger = MemoryLedger()
    ledger.register(model.parameters(), "parameters")
    ledger.register(model.buffers(), "buffers")
    ledger.register([s for state in optimizer.state.values() for s in state.values() if torch.is_tensor(s)],
                    "optimizer")
    ledger.register([t for t in inputs.values() if torch.is_tensor(t)], "inputs")
    ledger.watch_gradients(model.parameters())
    with ledger:
        _step(model, optimizer, inputs, ledger.phase)
    ours = ledger.peak_breakdown

    assert ours["parameters"] == theirs[_MemRefType.PARAM]
    assert ours.get("gradients", 0) == theirs[_MemRefType.GRAD]
    assert ours["optimizer"] == theirs[_MemRefType.OPT]
    # MemTracker counts the step's inputs as activations; the two agree on these to within 0.1 %, and on the total
    # to within 1 % (measured: 0.6 %; MemTracker's backward temporaries are 32 KiB more at the peak on this model).
    activations = ours["activations"] + ours["inputs"]
    assert abs(activations - theirs[_MemRefType.ACT]) <= 1e-3 * theirs[_MemRefType.ACT]
    assert abs(ledger.peak_bytes - theirs["Total"]) <= 1e-2 * theirs["Total"]
    assert ledger.peak_phase == "backward"
