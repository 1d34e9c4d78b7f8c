"""Shards to device batches: normals live on the device, compact records stream in, the GPU pastes.

Workers read whole batches of consecutive records (samples were shuffled at write time; the
batch order is shuffled per epoch from the seed), unpack the mask bits and compute flat target
indices. The device gathers the batch's normals, scatters the crops and mask pixels into them
with one ``index_put``, and applies the shared mild jitter as one colour matrix per sample.
The same code runs on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fractalsynth.color import P_CHROMA, P_LUMA, P_ROT
from fractalsynth.shards import ShardDataset, ShardError


class RecordBatches(Dataset):
    """Map-style dataset whose item ``k`` is the k-th full batch of records, ready to paste."""

    def __init__(self, shards: ShardDataset, batch_size: int):
        self.shards = shards
        self.batch_size = batch_size
        self.ranges = [(k, s, s + batch_size) for k, c in enumerate(shards.counts)
                       for s in range(0, int(c) - batch_size + 1, batch_size)]
        if not self.ranges:
            raise ShardError(f"{shards.root}: no shard holds a full batch of {batch_size} samples; "
                             "lower --batch-size or generate more samples")

    def __len__(self):
        return len(self.ranges)

    def __getitem__(self, k):
        shard, start, stop = self.ranges[k]
        rb = self.shards.records(shard, start, stop)
        s, ch = self.shards.size, self.shards.channels
        y, x, h, w = (rb.box[:, i].astype(np.int64) for i in range(4))
        areas = h * w
        sample = np.repeat(np.arange(len(rb)), areas)
        local = np.arange(areas.sum()) - np.repeat(np.cumsum(areas) - areas, areas)
        rows = local // np.repeat(w, areas) + np.repeat(y, areas)
        cols = local % np.repeat(w, areas) + np.repeat(x, areas)
        target = (sample * s + rows) * s + cols
        bits = [np.unpackbits(rb.mask_bits[rb.mask_offset[j]:rb.mask_offset[j + 1]],
                              count=int(areas[j])) for j in range(len(rb))]
        return {
            "normal_index": torch.from_numpy(rb.normal_index.astype(np.int64)),
            "target": torch.from_numpy(target),
            "pixels": torch.from_numpy(rb.pixels.reshape(-1, ch)),
            "mask": torch.from_numpy(np.concatenate(bits)),
            "jitter": torch.from_numpy(rb.jitter),
        }


def batch_order(n_batches: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list:
    """The batches of one epoch, shuffled by (seed, epoch); rank r takes every world-th."""
    perm = np.random.default_rng([seed, epoch, 5]).permutation(n_batches)
    return perm[rank::world].tolist()


class DeviceNormals:
    """The dataset's normal images and their mean lumas, resident on the device."""

    def __init__(self, shards: ShardDataset, device: torch.device):
        self.images = torch.from_numpy(shards.normals).to(device).permute(0, 3, 1, 2).contiguous()
        self.means = torch.from_numpy(shards.means.astype(np.float32)).to(device)
        self.channels = shards.channels
        self.device = device
        self._basis = [torch.tensor(p, dtype=torch.float32, device=device)
                       for p in (P_LUMA, P_CHROMA, P_ROT)]

    def rebuild(self, batch: dict):
        """(normal, anomalous, mask) float tensors in [0, 1], [B, C, S, S] / [B, 1, S, S]."""
        dev = self.device
        idx = batch["normal_index"].to(dev, non_blocking=True)
        target = batch["target"].to(dev, non_blocking=True)
        pixels = batch["pixels"].to(dev, non_blocking=True)
        maskv = batch["mask"].to(dev, non_blocking=True)
        jit = batch["jitter"].to(dev, non_blocking=True)
        base = self.images.index_select(0, idx)  # uint8 [B, C, S, S]
        b, c, s, _ = base.shape
        anom = base.permute(0, 2, 3, 1).reshape(-1, c).clone()
        anom.index_copy_(0, target, pixels)
        anom = anom.view(b, s, s, c).permute(0, 3, 1, 2)
        mask = torch.zeros(b * s * s, dtype=torch.uint8, device=dev)
        mask.index_copy_(0, target, maskv)
        mats, offs = self.jitter(jit, self.means.index_select(0, idx))
        normal = _color(base, mats, offs)
        anomalous = _color(anom, mats, offs)
        return normal, anomalous, mask.view(b, 1, s, s).float()

    def jitter(self, jit: torch.Tensor, means: torch.Tensor):
        """``fractalsynth.color.jitter_matrices`` for a batch, on the device."""
        b, c, s, h = jit.unbind(1)
        cb = c * b
        offset = (1 - c) * b * means
        if self.channels == 1:
            return cb.view(-1, 1, 1), offset
        p0, p1, p2 = self._basis
        ang = 2 * torch.pi * h
        m = p0 + (s * torch.cos(ang)).view(-1, 1, 1) * p1 + (s * torch.sin(ang)).view(-1, 1, 1) * p2
        return cb.view(-1, 1, 1) * m, offset


def _color(img_u8: torch.Tensor, mats: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """clip(M @ pixel + o) / 255 for a uint8 batch [B, C, S, S]."""
    x = img_u8.float()
    y = torch.einsum("bij,bjhw->bihw", mats, x) + offs.view(-1, 1, 1, 1)
    return y.clamp_(0.0, 255.0).mul_(1.0 / 255.0)


def _collate_one(items):
    return items[0]


def make_loader(batches: RecordBatches, order: list, workers: int) -> DataLoader:
    """A loader yielding the batches of ``order``; workers open the shard files lazily."""
    return DataLoader(torch.utils.data.Subset(batches, order), batch_size=1, shuffle=False,
                      num_workers=workers, collate_fn=_collate_one, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if workers else None)
