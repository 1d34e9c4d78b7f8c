"""fractalsynth: fractal synthetic anomalies for anomaly detection, without torch.

Public API (each module's docstring says more):

- ``ifs``: ``IFSConfig``, ``make_masks``, ``render_mask``, ``render``, ``render_texture``
- ``maskbank``: ``write_mask_bank``, ``load_masks``, ``load_mask_params``, ``mask_bank_info``
- ``anomaly``: ``FractalAnomaly``, ``AnomalyConfig`` (the fractal anomaly generation)
- ``shards`` / ``generate``: ``ShardDataset`` (numpy reader), ``generate``, ``verify_dataset``
"""
__version__ = "0.1.0"

from .ifs import IFSConfig, make_masks, render, render_mask, render_texture, sample_ifs  # noqa: E402
from .maskbank import load_mask_params, load_masks, mask_bank_info, write_mask_bank  # noqa: E402
from .anomaly import AnomalyConfig, FractalAnomaly  # noqa: E402
from .shards import ShardDataset, verify_dataset  # noqa: E402
from .generate import generate  # noqa: E402

__all__ = [
    "IFSConfig", "make_masks", "render", "render_mask", "render_texture", "sample_ifs",
    "load_masks", "load_mask_params", "mask_bank_info", "write_mask_bank",
    "AnomalyConfig", "FractalAnomaly", "ShardDataset", "verify_dataset", "generate",
]
