"""The time-embedding precision benchmark runs on the CPU and shows the physics it is there to show."""

from __future__ import annotations

import json

from bench.time_embedding_precision import main


def test_bf16_at_x1000_is_the_problem_and_float32_embeddings_fix_it(tmp_path):
    out = tmp_path / "precision.json"
    main(["--tiny", "--points", "33", "--out", str(out)])
    rows = {(r["variant"], r["time_scale"]): r for r in json.loads(out.read_text())["rows"]}
    tangent = {key: row["tangent_rel_err_median"] for key, row in rows.items()}
    assert tangent[("bf16", 1000.0)] > 10 * tangent[("bf16", 1.0)]
    assert tangent[("bf16 + fp32 time embedding", 1000.0)] < tangent[("bf16", 1000.0)] / 10
    assert all(row["temb_rel_err_max"] < 1e-5 for (variant, _), row in rows.items() if variant == "fp32")
