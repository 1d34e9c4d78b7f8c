"""FractalAD: frozen teacher, trained student, cosine-similarity attention, semantic-flow head.

Training sees (normal, anomalous, mask) triples:

- distillation: on the NORMAL image, ``sum over stages of mean(1 - cos(t, s))`` along channels;
- cosine-similarity attention (CSAM): on the ANOMALOUS image, per stage
  ``a = (1 - cos(t, s)) / 2`` and the head reads ``(a * s).detach()``;
- the semantic-flow FPN head predicts the mask (BCE on logits + soft Dice).

Texture mode (``kd=False``) has no student: the head reads the frozen teacher's features.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import build_backbone, load_pretrained


def cosine_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity along channels: [B, C, H, W] x2 -> [B, H, W]."""
    return 1.0 - F.cosine_similarity(t, s, dim=1, eps=1e-6)


def cosine_attention(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """CSAM: the student feature weighted by (1 - cos(t, s)) / 2, detached from the student."""
    a = (0.5 * cosine_distance(t, s)).unsqueeze(1)
    return (a * s).detach()


def student_teacher_map(teacher_feats, student_feats, size) -> torch.Tensor:
    """Mean over stages of the cosine distance, each upsampled to ``size``: [B, 1, H, W]."""
    maps = [F.interpolate(cosine_distance(t, s).unsqueeze(1).float(), size=size, mode="bilinear",
                          align_corners=False) for t, s in zip(teacher_feats, student_feats)]
    return sum(maps) / len(maps)


def distillation_loss(teacher_feats, student_feats) -> torch.Tensor:
    """Sum over stages of the mean cosine distance."""
    return sum(cosine_distance(t, s).mean() for t, s in zip(teacher_feats, student_feats))


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy on logits + soft Dice (per image, averaged)."""
    bce = F.binary_cross_entropy_with_logits(logits, mask)
    p = torch.sigmoid(logits).flatten(1)
    m = mask.flatten(1)
    dice = 1.0 - (2.0 * (p * m).sum(1) + smooth) / (p.sum(1) + m.sum(1) + smooth)
    return bce + dice.mean()


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of ``sigma`` pixels over a radius of 3 sigma (at least 1)."""
    radius = max(1, int(round(sigma * 3)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel of [B, C, H, W] blurred by the separable ``kernel``, borders mirrored."""
    b, c, h, w = images.shape
    r = kernel.numel() // 2
    k = kernel.to(images.dtype)
    # one single-channel image per plane: fixed-shape weights, which ONNX export needs
    x = F.pad(images.reshape(b * c, 1, h, w), (r, r, r, r), mode="reflect")
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d's running statistics into the conv registered just before it (in place)."""
    # every module here applies its batch norm straight to the output of the conv registered
    # before it (conv, bn pairs in MBConv, the ResNet blocks and the head's conv-bn-ReLU), so
    # the pair is one affine map: scale each output channel's weights and add a bias
    for parent in list(module.modules()):
        kids = list(parent.named_children())
        for (_, conv), (name, bn) in zip(kids, kids[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.running_var is not None and bn.num_features == conv.out_channels):
                continue
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                shift = -bn.running_mean * scale
                if bn.affine:
                    scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
                if conv.bias is not None:
                    shift = shift + conv.bias * scale
                conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
                conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
            setattr(parent, name, nn.Identity())
    return module


def _conv_bn_relu(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _identity_grid(h: int, w: int, device) -> torch.Tensor:
    ys = torch.linspace(-1.0, 1.0, h, device=device)
    xs = torch.linspace(-1.0, 1.0, w, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0)


class FlowAlign(nn.Module):
    """Warp a coarse map onto a finer grid by a learned flow (SFNet's alignment module)."""

    def __init__(self, channels):
        super().__init__()
        self.flow = nn.Conv2d(2 * channels, 2, 3, padding=1, bias=False)
        self._grids = {}

    def base_grid(self, h: int, w: int, device) -> torch.Tensor:
        """Identity sampling grid [1, h, w, 2] in [-1, 1] (float32, cached per size)."""
        if torch.compiler.is_compiling():  # traced once into the graph; no cache guards
            return _identity_grid(h, w, device)
        key = (h, w, str(device))
        if key not in self._grids:
            self._grids[key] = _identity_grid(h, w, device)
        return self._grids[key]

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        h, w = fine.shape[-2:]
        up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        flow = self.flow(torch.cat([fine, up], dim=1)).float()
        # flow is in pixels of the fine grid; grid_sample wants [-1, 1] units (kept in float32:
        # bf16 cannot resolve a pixel of a 64-pixel grid near the border)
        # (python-scalar factors: no host-to-device copy, so the step stays CUDA-graph capturable)
        offset = torch.stack([flow[:, 0] * (2.0 / max(w - 1, 1)), flow[:, 1] * (2.0 / max(h - 1, 1))],
                             dim=-1)
        grid = self.base_grid(h, w, fine.device) + offset
        # a NaN coordinate crashes grid_sample's CPU kernel (a segfault in the backward here,
        # torch 2.13; pytorch/pytorch#24823): a diverging run must live to reach fit's NaN check
        grid = torch.where(grid.isnan(), 0.0, grid)
        return F.grid_sample(coarse.float(), grid, mode="bilinear", padding_mode="border",
                             align_corners=True).to(coarse.dtype)


class SemanticFlowHead(nn.Module):
    """Semantic-flow FPN: 1x1 laterals, flow-aligned top-down path, fuse at stride 4, 1 logit."""

    def __init__(self, in_channels, width: int | None = None):
        super().__init__()
        c = width or min(in_channels)  # the method: the smallest stage width
        self.lateral = nn.ModuleList(nn.Conv2d(ci, c, 1) for ci in in_channels)
        self.align = nn.ModuleList(FlowAlign(c) for _ in in_channels[:-1])
        self.smooth = nn.ModuleList(_conv_bn_relu(c, c) for _ in in_channels)
        self.fuse = _conv_bn_relu(c * len(in_channels), c)
        self.out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, feats, out_size):
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        top = lat[-1]
        levels = [self.smooth[-1](top)]
        for i in range(len(lat) - 2, -1, -1):
            top = lat[i] + self.align[i](lat[i], top)
            levels.insert(0, self.smooth[i](top))
        size = levels[0].shape[-2:]
        fused = torch.cat([levels[0]] + [F.interpolate(p, size=size, mode="bilinear",
                                                       align_corners=False) for p in levels[1:]], 1)
        logits = self.out(self.fuse(fused))
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


class FractalAD(nn.Module):
    """The detector. ``forward(images)`` gives anomaly-map logits; ``training_losses`` trains it."""

    def __init__(self, backbone: str = "efficientnet_lite0", kd: bool = True,
                 weights: str | None = None, pretrained: bool = True, head_width: int | None = None,
                 input_blur: float = 0.0):
        super().__init__()
        self.backbone_name = backbone
        self.kd = kd
        self.input_blur = input_blur
        # derived from the setting, so not saved: runs without a blur load as before
        self.register_buffer("blur_kernel", gaussian_kernel(input_blur) if input_blur > 0 else None,
                             persistent=False)
        self.teacher = load_pretrained(backbone, weights) if pretrained else build_backbone(backbone)
        self.teacher.requires_grad_(False)
        self.student = build_backbone(backbone) if kd else None
        self.head = SemanticFlowHead(self.teacher.channels, head_width)
        self.folded = False  # fold_batchnorm: inference only from then on

    def train(self, mode: bool = True):
        if mode and self.folded:
            raise RuntimeError("this model's batch norms are folded into its convs, for inference "
                               "only; to train on, build a FractalAD and load the run's weights")
        super().train(mode)
        self.teacher.eval()  # frozen: its batch-norm statistics never move
        return self

    def fold_batchnorm(self) -> "FractalAD":
        """For inference only: every batch norm folded into its conv (1.1-1.25x the CPU maps/s)."""
        self.eval()
        fold_batchnorm(self)
        self.folded = True
        return self

    def head_features(self, t_feats, s_feats):
        if not self.kd:
            return t_feats
        return [cosine_attention(t, s) for t, s in zip(t_feats, s_feats)]

    def forward(self, images: torch.Tensor, normal: torch.Tensor | None = None,
                mask: torch.Tensor | None = None):
        """Anomaly-map logits [B, 1, H, W] for images [B, C, H, W] in [0, 1].

        Given the ``normal`` twins and the ``mask`` too, returns the training losses instead
        (``images`` being the anomalous ones), so DDP can wrap the training call.
        """
        if mask is not None:
            return self.training_losses(normal, images, mask)
        return self._inference(images)[2]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The images as the backbones see them: blurred first when the run was trained so."""
        if self.blur_kernel is None:
            return images
        out = gaussian_blur(images, self.blur_kernel)
        if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)  # what the GPU step feeds
        return out

    def _inference(self, images: torch.Tensor):
        """(teacher features, student features or None, anomaly-map logits) of ``images``."""
        images = self.prepare(images)
        with torch.no_grad():
            t = self.teacher(images)
        s = self.student(images) if self.kd else None
        return t, s, self.head(self.head_features(t, s), images.shape[-2:])

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """sigmoid of the logits: per-pixel anomaly probability (float32)."""
        return torch.sigmoid(self(images).float())

    def map_pair(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 2, H, W] float32: the head's map (sigmoid) and the student-teacher map."""
        if not self.kd:
            raise ValueError("the student-teacher map needs a distillation run (this one has no student)")
        t, s, logits = self._inference(images)
        return torch.cat([torch.sigmoid(logits.float()), student_teacher_map(t, s, images.shape[-2:])], 1)

    def training_losses(self, normal: torch.Tensor, anomalous: torch.Tensor, mask: torch.Tensor):
        """(total, distillation, segmentation) losses of one batch."""
        b = normal.shape[0]
        if self.kd:
            # one pass each for teacher and student; the student's batch-norm statistics span
            # both halves. Separate student passes (the anomalous one without autograd) train
            # 1.4x faster on the CPU but scored lower image_AUROC over two seeds (README).
            both = self.prepare(torch.cat([normal, anomalous], dim=0))
            with torch.no_grad():
                t = self.teacher(both)
            s = self.student(both)
            kd = distillation_loss([f[:b] for f in t], [f[:b] for f in s])
            feats = self.head_features([f[b:] for f in t], [f[b:] for f in s])
        else:
            with torch.no_grad():  # texture mode: the normal twin is not used
                feats = self.teacher(self.prepare(anomalous))
            kd = torch.zeros((), device=normal.device)
        logits = self.head(feats, anomalous.shape[-2:])
        seg = segmentation_loss(logits.float(), mask)
        return kd + seg, kd.detach(), seg.detach()

    def trainable_state(self) -> dict:
        """Student and head weights (the teacher is the public checkpoint)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}
