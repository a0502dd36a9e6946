"""Training data: (image, caption) sources, the reference transform, resumable rank-sharded batches, conditioning
of a batch, and the embedding cache.

```python
from t2i_distill.data import DataConfig, TrainData, encode_batch, load_cache_manifest
data = TrainData(DataConfig(dataset_name="my_images/"), batch_size=4, seed=0, rank=0, world_size=1)
batch = encode_batch(next(iter(data)), text_encoders, vae)   # latents, prompt_embeds, pooled_prompt_embeds
```

Importing this package imports neither diffusers nor transformers (nor ``datasets``: sources open it lazily).
"""

from t2i_distill.data.cache import CacheManifest, CacheReader, build_cache, load_cache_manifest, load_empty_prompt
from t2i_distill.data.config import DataConfig
from t2i_distill.data.encode import encode_batch
from t2i_distill.data.loader import TrainData
from t2i_distill.data.sources import open_source, resolve_source
from t2i_distill.data.transforms import image_to_tensor, resize_center_crop

__all__ = ["CacheManifest", "CacheReader", "DataConfig", "TrainData", "build_cache", "encode_batch",
           "image_to_tensor", "load_cache_manifest", "load_empty_prompt", "open_source", "resize_center_crop",
           "resolve_source"]
