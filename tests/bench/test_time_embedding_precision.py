"""The time-embedding precision benchmark runs on the CPU and shows the physics it is there to show."""

from __future__ import annotations

import json

from bench.time_embedding_precision import main


def test_bf16_at_x1000_is_the_problem_and_float32_embeddings_fix_it(tmp_path):
    out = tmp_path / "precision.json"
    result = main(["--tiny", "--points", "33", "--out", str(out)])
    assert out.exists() and json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {(r["variant"], r["time_scale"]): r for r in result["rows"]}
    assert set(rows) == {(v, s) for v in ("bf16", "bf16 + fp32 time embedding", "fp32") for s in (1000.0, 1.0)}
    tangent = {key: row["tangent_rel_err_median"] for key, row in rows.items()}
    temb = {key: row["temb_rel_err_median"] for key, row in rows.items()}
    # ×1000 with the reference's bf16 casts: t·1000 rounded to bf16 wrecks the tangent; ×1 does not.
    assert tangent[("bf16", 1000.0)] > 10 * tangent[("bf16", 1.0)]
    # rCM's fix: the same bf16 model with float32 time embeddings is back at the bf16 floor, at ×1000 too.
    assert tangent[("bf16 + fp32 time embedding", 1000.0)] < tangent[("bf16", 1000.0)] / 10
    assert temb[("bf16 + fp32 time embedding", 1000.0)] < temb[("bf16", 1000.0)] / 10
    assert all(row["temb_rel_err_max"] < 1e-5 and row["tangent_rel_err_max"] < 1e-5
               for (variant, _), row in rows.items() if variant == "fp32")
    assert "×" in result["conclusion"]
