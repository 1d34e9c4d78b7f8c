"""Shards to device batches: normals live on the device, compact records stream in, the GPU pastes.

Workers read whole batches of consecutive records (samples were shuffled at write time; the
batch order is shuffled per epoch from the seed) and pack each into ONE uint8 buffer: the
records' small fields as 32-bit words, then the crops' pixels and packed mask bits as stored.
One buffer means one shared-memory segment per batch between processes and one pinned
host-to-device copy; the device derives every paste index from the boxes, so the transfer is
about the crop bytes themselves. The device gathers the batch's normals, scatters crops and
unpacked mask bits into them with one ``index_copy_`` each, and applies the shared mild jitter
as one colour matrix per sample. The same code runs on the CPU.
"""
from __future__ import annotations

import signal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fractalsynth.color import P_CHROMA, P_LUMA, P_ROT
from fractalsynth.shards import RecordBatch, ShardDataset, ShardError

WORDS_PER_RECORD = 10  # normal index, box (y, x, h, w), mask-bits start, jitter (4 x float32)


def pack_records(rb: RecordBatch) -> torch.Tensor:
    """A record batch as one uint8 tensor: ``WORDS_PER_RECORD`` int32 words per record, pixels, bits."""
    n = len(rb)
    words = np.empty((WORDS_PER_RECORD, n), np.int32)
    words[0] = rb.normal_index
    words[1:5] = rb.box.T
    words[5] = rb.mask_offset[:-1]
    words[6:10] = rb.jitter.astype(np.float32).T.view(np.int32)
    parts = (words.reshape(-1).view(np.uint8), rb.pixels.reshape(-1), rb.mask_bits)
    return torch.from_numpy(np.concatenate(parts))


def unpack_records(buf: torch.Tensor, n: int, n_pixels: int, channels: int):
    """Views into a packed buffer: (normal_index, box, mask_start, jitter, pixels, mask_bits)."""
    head = WORDS_PER_RECORD * n * 4
    words = buf[:head].view(torch.int32).view(WORDS_PER_RECORD, n)
    pixels = buf[head:head + n_pixels * channels].view(n_pixels, channels)
    bits = buf[head + n_pixels * channels:]
    return (words[0].long(), words[1:5].T.long(), words[5].long(),
            words[6:10].view(torch.float32).T, pixels, bits)


def paste_indices(box: torch.Tensor, size: int, n_pixels: int, n_rows: int):
    """Flat [B*size*size] canvas index of every crop pixel, with (pixel number, each record's
    first pixel, each record's area) for ``unpack_mask_bits``."""
    # sizes come from the host (n_pixels = sum h*w, n_rows = sum h), so nothing syncs; a crop
    # row is a run of consecutive canvas indices, so one offset per row places it
    dev = box.device
    y, x, h, w = box.unbind(1)
    row_record = torch.repeat_interleave(torch.arange(len(box), device=dev), h, output_size=n_rows)
    row_in_box = torch.arange(n_rows, device=dev) - (torch.cumsum(h, 0) - h)[row_record]
    areas = h * w
    first_pixel = torch.cumsum(areas, 0) - areas
    row_width = w[row_record]
    row_pixel = first_pixel[row_record] + row_in_box * row_width
    row_canvas = (row_record * size + y[row_record] + row_in_box) * size + x[row_record]
    pixel = torch.arange(n_pixels, device=dev)
    target = pixel + torch.repeat_interleave(row_canvas - row_pixel, row_width, output_size=n_pixels)
    return target, pixel, first_pixel, areas


def unpack_mask_bits(bits: torch.Tensor, start: torch.Tensor, pixel: torch.Tensor,
                     first_pixel: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask value of every crop pixel from per-record ``np.packbits`` streams (MSB first)."""
    shift = torch.repeat_interleave(start * 8 - first_pixel, areas, output_size=len(pixel))
    bit = pixel + shift
    return (bits[bit >> 3] >> (7 - (bit & 7)).to(torch.uint8)) & 1


class RecordBatches(Dataset):
    """Map-style dataset whose item ``k`` is the k-th full batch of records, packed for the device."""

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
        h, w = rb.box[:, 2].astype(np.int64), rb.box[:, 3].astype(np.int64)
        return {"packed": pack_records(rb), "n": len(rb), "n_pixels": int((h * w).sum()),
                "n_rows": int(h.sum())}


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
        buf = batch["packed"].to(self.device, non_blocking=True)
        idx, box, start, jit, pixels, bits = unpack_records(buf, batch["n"], batch["n_pixels"],
                                                            self.channels)
        base = self.images.index_select(0, idx)  # uint8 [B, C, S, S]
        b, c, s, _ = base.shape
        target, pixel, first, areas = paste_indices(box, s, batch["n_pixels"], batch["n_rows"])
        anom = base.permute(0, 2, 3, 1).reshape(-1, c).clone()
        anom.index_copy_(0, target, pixels)
        anom = anom.view(b, s, s, c).permute(0, 3, 1, 2)
        mask = torch.zeros(b * s * s, dtype=torch.uint8, device=self.device)
        mask.index_copy_(0, target, unpack_mask_bits(bits, start, pixel, first, areas))
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


def show_clean(normal: torch.Tensor, anomalous: torch.Tensor, mask: torch.Tensor, share: float,
               generator: torch.Generator):
    """Each sample with probability ``share`` loses its anomaly: its normal image, an empty mask."""
    keep = torch.rand(normal.shape[0], device=normal.device, generator=generator) >= share
    keep = keep.view(-1, 1, 1, 1)
    return torch.where(keep, anomalous, normal), mask * keep


def random_flips(tensors, generator: torch.Generator):
    """The same random horizontal and vertical flip of each sample applied to every tensor."""
    b, dev = tensors[0].shape[0], tensors[0].device
    out = list(tensors)
    for dim in (-1, -2):
        flip = (torch.rand(b, device=dev, generator=generator) < 0.5).view(-1, 1, 1, 1)
        out = [torch.where(flip, x.flip(dim), x) for x in out]
    return out


def random_zoom(tensors, max_zoom: float, generator: torch.Generator):
    """Each sample's tensors magnified alike, by a random factor in [1, max_zoom] at a random spot."""
    b, dev = tensors[0].shape[0], tensors[0].device
    u = torch.rand(3, b, device=dev, generator=generator)
    scale = 1.0 / (1.0 + (max_zoom - 1.0) * u[0])  # the crop's side, as a fraction of the image
    # the crop stays inside the image: its centre moves by at most 1 - scale (grid units)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, 0, 2] = (2.0 * u[1] - 1.0) * (1.0 - scale)
    theta[:, 1, 2] = (2.0 * u[2] - 1.0) * (1.0 - scale)
    grid = F.affine_grid(theta, list(tensors[0].shape), align_corners=False)
    *images, mask = tensors  # the mask last: nearest neighbour keeps it binary
    out = [F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False) for x in images]
    return out + [F.grid_sample(mask, grid.to(mask.dtype), mode="nearest", align_corners=False)]


class AnomalySamples(Dataset):
    """Float tensors for any PyTorch model: sample ``i`` of a shard set, or made on the fly.

    ``AnomalySamples(ShardDataset("shards/"))`` reads the shard set; ``AnomalySamples(images,
    FractalAnomaly(...), length=n)`` makes sample ``i`` from ``images[i % len(images)]`` with
    ``index=i``, so it is the same whatever the worker count. Items are (normal, anomalous,
    mask): [C, S, S] and [C, S, S] in [0, 1], and [1, S, S] of 0 / 1, all float32.
    """

    def __init__(self, source, generator=None, length: int | None = None):
        if generator is None and (length is not None or not isinstance(source, ShardDataset)):
            raise ValueError("give a ShardDataset alone, or images with a FractalAnomaly generator")
        self.source, self.generator = source, generator
        self.length = len(source) if length is None else int(length)
        if generator is not None and not len(source):
            raise ValueError("no images to make anomalies from")
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {self.length}")

    def __len__(self):
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range for {self.length} samples")
        if self.generator is None:
            normal, anomalous, mask = self.source[i]
        else:
            normal, anomalous, mask = self.generator(self.source[i % len(self.source)], index=i)

        def image(a):
            return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float().div_(255.0)
        return image(normal), image(anomalous), torch.from_numpy(mask > 0).float().unsqueeze(0)


def _collate_one(items):
    return items[0]


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader worker's start: Ctrl-C and SIGTERM are left to the training process."""
    # a terminal's Ctrl-C reaches the whole process group: a worker that died of it could
    # leave fit waiting for a batch that never comes, instead of stopping after its step
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(batches: RecordBatches, order: list, workers: int) -> DataLoader:
    """A loader yielding the batches of ``order``; workers open the shard files lazily."""
    return DataLoader(torch.utils.data.Subset(batches, order), batch_size=1, shuffle=False,
                      num_workers=workers, collate_fn=_collate_one, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if workers else None,
                      worker_init_fn=ignore_stop_signals if workers else None)
