"""The benchmark suite's definitions: what is compared (ops, student steps), how it is run and reported.

* :mod:`~t2i_distill.benchmarks.ops`: every kernel as an ``OpSpec`` (inputs, reference, parity, timing cases).
* :mod:`~t2i_distill.benchmarks.steps`: sCM / MeanFlow student steps, reference vs patched vs dual forward.
* :mod:`~t2i_distill.benchmarks.runner`: timing/parity rows and their tables.

Consumers: ``t2i-distill demo`` (tiny shapes, CPU or GPU), ``bench/gpu_check.py`` (FLUX shapes, GPU) and the
pytest-benchmark files ``bench/test_bench_*.py``.
"""
