"""Loss configs: the reference's CLI defaults (Appendix A), and a ValueError naming the field for a bad value."""

from __future__ import annotations

import pytest

from t2i_distill.losses import MeanFlowConfig, SCMConfig


@pytest.mark.parametrize("cls, field, value", [
    (SCMConfig, "sigma_data", 0.0), (SCMConfig, "logit_std", -1.0), (SCMConfig, "scm_cfg_scale", ()),
    (SCMConfig, "tangent_warmup_steps", 1.5), (SCMConfig, "time_sampler_sigma", "0.5"),
    (SCMConfig, "scm_lambda", float("nan")), (MeanFlowConfig, "path_type", "cos"),
    (MeanFlowConfig, "ratio_r_not_equal_t", 1.5), (MeanFlowConfig, "cfg_velocity_at", "r"),
    (MeanFlowConfig, "tangent", "student"), (MeanFlowConfig, "weighting", "none"),
    (MeanFlowConfig, "use_cfg_meanflow", "True"), (MeanFlowConfig, "cfg_prob", -0.1),
    (MeanFlowConfig, "cfg_scale", "4"),
])
def test_config_rejects_bad_values_naming_the_field(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})


def test_config_defaults_are_the_reference_cli_defaults():
    scm = SCMConfig()
    assert (scm.sigma_data, scm.logit_mean, scm.logit_std, scm.scm_cfg_scale, scm.tangent_warmup_steps,
            scm.tangent_norm_constant, scm.scm_lambda) == (0.5, 0.0, 1.0, (4.0, 4.5, 5.0), 4000, 0.1, 1.0)
    assert [scm.tangent_warmup(s) for s in (0, 2000, 4000, 8000)] == [0, 0.5, 1, 1]
    assert SCMConfig(tangent_warmup_steps=0).tangent_warmup(0) == 1.0
    mf = MeanFlowConfig()
    assert (mf.time_mu, mf.time_sigma, mf.ratio_r_not_equal_t, mf.adaptive_p, mf.adaptive_eps, mf.cfg_prob,
            mf.cfg_omega, mf.cfg_kappa, mf.cfg_min_t, mf.cfg_max_t, mf.use_cfg_meanflow, mf.weighting,
            mf.path_type, mf.time_sampler) == (-0.4, 1.0, 0.75, 1.0, 1e-3, 0.1, 1.0, 0.0, 0.0, 1.0, False,
                                               "adaptive", "linear", "logit_normal")
    with pytest.raises(ValueError, match="cfg_min_t"):
        MeanFlowConfig(cfg_min_t=0.8, cfg_max_t=0.3)
