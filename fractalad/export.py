"""Export a trained run as ONNX or TorchScript: float input [B, C, S, S] in [0, 1], output the
anomaly map [B, 1, S, S]: the head's sigmoid, or the combined map ``test --map combined`` scaled.

Both formats take the run's own size S only. Tracing records S in the model (the backbone's
TF-"same" padding, the flow head's sampling grids), so another size would run and give wrong
maps: the TorchScript file checks the shape and raises, ONNX declares it fixed. A run trained
on pieces (``generate --pieces``) takes pieces: its ``piece_aspect`` is saved with the model
(TorchScript extra file, ONNX metadata) so that a caller can cut images with
``fractalsynth.images.piece_boxes``."""
from __future__ import annotations

import io
import os

import torch

from .evaluate import MapNorm, load_run, saved_map_norm


class AnomalyMapModel(torch.nn.Module):
    """images in [0, 1] -> the head's anomaly probability, or with ``norm`` the combined map."""

    def __init__(self, model, norm: MapNorm | None = None):
        super().__init__()
        self.model = model
        self.combined = norm is not None
        if norm is not None:  # MapNorm.combine, in torch
            lo, span = norm.offsets_and_spans()
            self.register_buffer("lo", torch.from_numpy(lo))
            self.register_buffer("span", torch.from_numpy(span))

    def forward(self, images):
        if not self.combined:
            return self.model.anomaly_map(images)
        return 0.25 * ((self.model.map_pair(images) - self.lo) / self.span).sum(1, keepdim=True)


class ShapeChecked(torch.nn.Module):
    """A traced model that refuses any input but [B, channels, size, size] with one clear error."""

    def __init__(self, traced, channels: int, size: int):
        super().__init__()
        self.traced = traced
        self.channels = channels
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shape = images.shape
        if len(shape) != 4 or shape[1] != self.channels or shape[2] != self.size \
                or shape[3] != self.size:
            raise ValueError("this model takes images [B, {}, {}, {}] in [0, 1], got {}; resize "
                             "them to {} x {} first".format(self.channels, self.size, self.size,
                                                            list(shape), self.size, self.size))
        return self.traced(images)


def export_run(run_dir: str, fmt: str, out: str, batch_size: int = 1, map_kind: str = "head",
               trained: bool = False) -> str:
    """Write ``out`` in ``fmt`` ('onnx' or 'torchscript'); returns the path.

    ``map_kind`` 'combined' bakes in the scales ``test --map combined`` saved for the run.
    ``trained``: an ``--ema`` run's trained weights, not their moving average.
    """
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"unknown format {fmt!r}; choose onnx or torchscript")
    model, meta = load_run(run_dir, "cpu", trained)
    norm = saved_map_norm(run_dir) if map_kind == "combined" else None
    wrapper = AnomalyMapModel(model, norm).eval()
    example = torch.rand(batch_size, meta["channels"], meta["size"], meta["size"])
    if os.path.isdir(out):
        raise ValueError(f"{out}: is a folder; --out takes a file name such as model.{fmt[:4]}")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(f"{out}: cannot make its folder ({e.strerror}); choose another --out") from None
    if not os.access(out if os.path.exists(out) else folder, os.W_OK):
        raise OSError(f"{out}: not writable; choose another --out")
    with torch.no_grad():
        size = str(meta["size"])
        aspect = str(meta.get("piece_aspect", 0.0))
        if fmt == "torchscript":
            traced = torch.jit.trace(wrapper, example)
            torch.jit.script(ShapeChecked(traced, meta["channels"], meta["size"])).save(
                out, _extra_files={"input_size": size.encode(), "piece_aspect": aspect.encode()})
        else:
            import onnx
            buffer = io.BytesIO()  # in memory: the file is written once, metadata included
            torch.onnx.export(wrapper, (example,), buffer, input_names=["images"],
                              output_names=["anomaly_map"], opset_version=17,
                              dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"}},
                              dynamo=False)
            exported = onnx.load_model_from_string(buffer.getvalue())
            onnx.helper.set_model_props(exported, {"input_size": size, "map": map_kind,
                                                   "piece_aspect": aspect})
            onnx.save(exported, out)
    return out
