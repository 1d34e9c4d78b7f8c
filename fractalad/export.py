"""Export a trained run as ONNX or TorchScript: uint8-free float input [B, C, S, S] in [0, 1],
output the anomaly map (sigmoid) [B, 1, S, S]."""
from __future__ import annotations

import os

import torch

from .evaluate import load_run


class AnomalyMapModel(torch.nn.Module):
    """images in [0, 1] -> per-pixel anomaly probability."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.anomaly_map(images)


def export_run(run_dir: str, fmt: str, out: str, batch_size: int = 1) -> str:
    """Write ``out`` in ``fmt`` ('onnx' or 'torchscript'); returns the path."""
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"unknown format {fmt!r}; choose onnx or torchscript")
    model, meta = load_run(run_dir, "cpu")
    wrapper = AnomalyMapModel(model).eval()
    example = torch.rand(batch_size, meta["channels"], meta["size"], meta["size"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.trace(wrapper, example).save(out)
        else:
            torch.onnx.export(wrapper, (example,), out, input_names=["images"],
                              output_names=["anomaly_map"], opset_version=17,
                              dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"}},
                              dynamo=False)
    return out
