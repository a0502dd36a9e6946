"""The offline demo's shipped teacher: a tiny FLUX pipeline trained on synthetic coloured shapes.

* :func:`demo_teacher_path`: the shipped folder (``--pretrained_model_name_or_path`` of the trainers);
* :func:`load_demo_pipeline`: ``FluxPipeline.from_pretrained`` of it with the ×1 ``FluxStudent`` transformer;
* :func:`train_demo_teacher`: regenerate it from its seed (``t2i-distill demo-teacher``).
"""

from t2i_distill.demo.teacher import DemoTeacherConfig, demo_teacher_path, load_demo_pipeline, train_demo_teacher

__all__ = ["DemoTeacherConfig", "demo_teacher_path", "load_demo_pipeline", "train_demo_teacher"]
