"""Evaluation: the synthetic shapes dataset, GenEval-layout generation and the classical mini-GenEval scorer.

* :mod:`~t2i_distill.eval.shapes`: the captioned coloured-shapes imagefolder and the mini-GenEval prompts.
* :mod:`~t2i_distill.eval.geneval`: GenEval's output layout, sharded (RANK/WORLD_SIZE) resumable generation.
* :mod:`~t2i_distill.eval.scorer`: colour segmentation + connected components + shape test; per-task accuracy.
* :mod:`~t2i_distill.eval.grid`: a labelled PNG grid of samples.

Nothing here is imported eagerly (the modules pull in torch/diffusers only when used).
"""


def add_subparsers(subparsers) -> None:
    """Register ``sample``, ``geneval``, ``score`` and ``shapes`` on a ``t2i-distill`` subparsers object."""
    from t2i_distill.eval import geneval, scorer, shapes
    from t2i_distill.pipelines import sample

    for module in (sample, geneval, scorer, shapes):
        module.add_subparser(subparsers)
