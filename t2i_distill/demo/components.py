"""The library ``model_index.json`` of the demo teacher names for its transformer: ``["t2i_distill.demo.components",
"FluxStudent"]``.

diffusers 0.42 loads a component of a non-diffusers library as ``getattr(sys.modules[library], class_name)`` and picks
its load method by checking the class against base classes *looked up in that same module* (``ModelMixin``, ...).
``t2i_distill.models.flux`` does not export ``ModelMixin``, so it cannot be named there; this module exports both.
It must be imported before ``FluxPipeline.from_pretrained`` (diffusers never imports a library a repository names):
without it, loading raises a ``ValueError`` naming this module instead of silently building stock ×1000 FLUX.
"""

from diffusers import ModelMixin

from t2i_distill.models.flux import FluxStudent

#: The ``model_index.json`` entry of the ×1 transformer.
TRANSFORMER_ENTRY = [__name__, FluxStudent.__name__]

__all__ = ["TRANSFORMER_ENTRY", "FluxStudent", "ModelMixin"]
