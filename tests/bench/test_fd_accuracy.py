"""The finite-difference accuracy benchmark runs on the CPU and shows a forward difference's two error ends."""

from __future__ import annotations

import json

from bench.fd_accuracy import main


def test_fd_accuracy_table_shows_truncation_and_rounding_and_func_is_exact(tmp_path):
    out = tmp_path / "fd.json"
    main(["--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    for method in ("scm", "meanflow"):
        by_eps = {r["epsilon"]: r["max_grad_rel_err"] for r in rows if r["method"] == method and r["mode"] == "fd"}
        func = next(r["max_grad_rel_err"] for r in rows if r["method"] == method and r["mode"] == "func")
        assert by_eps[1e-3] < by_eps[1e-1] and by_eps[1e-3] < by_eps[1e-5]  # truncation vs float32 rounding
        assert func < by_eps[1e-3] / 10  # the exact tangent is far closer than any ε
