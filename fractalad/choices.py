"""The names and defaults the command line offers, importable without torch.

Each module that acts on a setting imports it from here, so ``fractalad --help`` and a mistyped
option answer without the seconds torch takes to import.
"""
from __future__ import annotations

from fractalsynth.placement import MVTEC_CATEGORIES, preset_placement

BACKBONES = ("efficientnet_lite0", "resnet18", "resnet34", "resnet50", "wide_resnet50_2")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# fit --precision: the FitConfig settings of each choice
PRECISIONS = {"auto": {"bf16": True, "cpu_bf16": False}, "bf16": {"bf16": True, "cpu_bf16": True},
              "fp32": {"bf16": False, "cpu_bf16": False}}
MAP_KINDS = ("head", "combined")
IMAGE_SCORES = ("max", "mean")
NORMALS_QUANTILE = 0.99  # calibrate's default: 1 % of normals flagged
FORMATS = ("onnx", "pt2", "torchscript")

# Paper settings per MVTec AD category: textures skip distillation; objects on plain
# backgrounds get foreground placement (used by 'fractalsynth generate --preset').
TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
PRESETS = {c: {"kd": c not in TEXTURES, "placement": preset_placement(c)} for c in MVTEC_CATEGORIES}
