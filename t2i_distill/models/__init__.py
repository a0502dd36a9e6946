"""FLUX models of the reference system (reference-spec §3.1–3.2) and their loaders.

* :class:`FluxStudent`: diffusers' FLUX with ``time_scale`` (1.0: the reference's ×1 "X1" time/guidance inputs) and
  the optional MeanFlow second timestep (``dual_timestep=True``); the teacher of both methods and the MeanFlow student.
* :class:`TrigFlowStudent`: the sCM student/teacher, FLUX seen in TrigFlow time, with the ``logvar`` head; and the
  pure maps :func:`trigflow_to_flow_time`, :func:`flow_input_scale`, :func:`flow_to_trigflow_velocity`.
* :func:`load_student`, :func:`load_state_dict_file`, :class:`LoadReport`: ``from_pretrained`` + the rescaled
  checkpoint, with every mismatching key reported by name.
"""

from t2i_distill.models.checkpoint_files import Checkpoint, read_checkpoint
from t2i_distill.models.flux import FluxStudent
from t2i_distill.models.loading import LoadReport, check_load, load_state_dict_file, load_student
from t2i_distill.models.trigflow import (
    TrigFlowStudent,
    flow_input_scale,
    flow_to_trigflow_velocity,
    trigflow_to_flow_time,
)

__all__ = [
    "Checkpoint",
    "FluxStudent",
    "LoadReport",
    "TrigFlowStudent",
    "flow_input_scale",
    "flow_to_trigflow_velocity",
    "check_load",
    "load_state_dict_file",
    "load_student",
    "read_checkpoint",
    "trigflow_to_flow_time",
]
