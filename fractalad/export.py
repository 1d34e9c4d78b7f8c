"""Export a trained run as ONNX, a ``torch.export`` program (.pt2) or TorchScript: float input
[B, C, S, S] in [0, 1], output the anomaly map [B, 1, S, S]: the head's sigmoid, or the
combined map ``test --map combined`` scaled.

ONNX and .pt2 are both built by ``torch.export`` (PyTorch's successor to tracing, which it
deprecates); TorchScript is traced, for runtimes that still load it. Every format takes the
run's own size S only, with any batch size: a model trained at S scores other sizes badly, and
the graph records S (the backbone's TF-"same" padding, the flow head's sampling grids). ONNX
declares S fixed, the .pt2 program guards it, the TorchScript file checks it and raises. A run
trained on pieces (``generate --pieces``) takes pieces: its ``piece_aspect`` is saved with the
model (ONNX metadata, .pt2 and TorchScript extra files) so that a caller can cut images with
``fractalsynth.images.piece_boxes``."""
from __future__ import annotations

import logging
import os
import warnings

import torch

from .choices import FORMATS
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


def export_run(run_dir: str, fmt: str, out: str, map_kind: str = "head",
               trained: bool = False) -> str:
    """Write ``out`` in ``fmt`` ('onnx', 'pt2' or 'torchscript'); returns the path.

    ``map_kind`` 'combined' bakes in the scales ``test --map combined`` saved for the run.
    ``trained``: an ``--ema`` run's trained weights, not their moving average.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model, meta = load_run(run_dir, "cpu", trained)
    norm = saved_map_norm(run_dir) if map_kind == "combined" else None
    wrapper = AnomalyMapModel(model, norm).eval()
    # every format takes any batch; a batch of 2 because torch.export takes 1 for a constant
    example = torch.rand(2, meta["channels"], meta["size"], meta["size"])
    _check_out(out, fmt)
    props = {"input_size": str(meta["size"]), "map": map_kind,
             "piece_aspect": str(meta.get("piece_aspect", 0.0))}
    batch = {"images": {0: torch.export.Dim("batch")}}
    with torch.no_grad():
        if fmt == "torchscript":
            with warnings.catch_warnings():  # the sizes it fixes are S, which ShapeChecked guards
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(wrapper, example)
            torch.jit.script(ShapeChecked(traced, meta["channels"], meta["size"])).save(
                out, _extra_files={k: v.encode() for k, v in props.items()})
        elif fmt == "pt2":
            torch.export.save(torch.export.export(wrapper, (example,), dynamic_shapes=batch), out,
                              extra_files=props)
        else:
            _write_onnx(wrapper, example, batch, out, props)
    return out


def _check_out(out: str, fmt: str) -> None:
    if os.path.isdir(out):
        suffix = {"torchscript": "pt"}.get(fmt, fmt)
        raise ValueError(f"{out}: is a folder; --out takes a file name such as model.{suffix}")
    folder = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(f"{out}: cannot make its folder ({e.strerror}); choose another --out") from None
    if not os.access(out if os.path.exists(out) else folder, os.W_OK):
        raise OSError(f"{out}: not writable; choose another --out")


def _write_onnx(wrapper, example, dynamic_shapes, out: str, props: dict) -> None:
    """``wrapper`` through PyTorch's torch.export-based exporter, ``props`` as metadata, one file."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's translator; without it torch fails late)
    except ImportError as e:
        raise RuntimeError(f"ONNX export needs the {e.name} package: pip install onnx onnxscript "
                           "(or the package's [export] extra)") from None
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it lists every torchvision op it skips, as warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            exported = torch.onnx.export(wrapper, (example,), None, input_names=["images"],
                                         output_names=["anomaly_map"], dynamo=True,
                                         dynamic_shapes=dynamic_shapes, verbose=False)
    finally:
        logger.setLevel(level)
    proto = exported.model_proto
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, out)
