"""Other PyTorch models reuse the samples: shards and on-the-fly synthesis through a DataLoader."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fractalad.data import AnomalySamples
from fractalsynth.anomaly import AnomalyConfig, FractalAnomaly
from fractalsynth.generate import generate
from fractalsynth.images import list_images, load_image
from fractalsynth.shards import ShardDataset

CFG = AnomalyConfig(size=40, channels="rgb")


def _all(loader):
    return [torch.cat(parts) for parts in zip(*loader)]


def _expected(triples):
    """The uint8 triples as the adapter's float tensors, stacked."""
    n, a, m = (np.stack(x) for x in zip(*triples))
    return [torch.from_numpy(n.transpose(0, 3, 1, 2) / 255.0).float(),
            torch.from_numpy(a.transpose(0, 3, 1, 2) / 255.0).float(),
            torch.from_numpy((m > 0)[:, None]).float()]


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_and_on_the_fly_samples_through_a_dataloader(normals_dir, tmp_path, workers):
    out = str(tmp_path / "ds")
    generate(normals_dir, out, 10, CFG, seed=2, shard_size=4)
    shards = ShardDataset(out)
    # spawned workers: the dataset travels pickled, and shard files reopen in each worker
    kw = {"num_workers": workers, "multiprocessing_context": "spawn"} if workers else {}
    got = _all(DataLoader(AnomalySamples(shards), batch_size=3, **kw))
    want = _expected([shards[i] for i in range(len(shards))])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert torch.equal(g, w)
    assert got[2].unique().tolist() == [0.0, 1.0]
    images = [load_image(p) for p in list_images(normals_dir)]
    gen = FractalAnomaly(config=CFG, size=40, seed=5)
    got = _all(DataLoader(AnomalySamples(images, gen, length=9), batch_size=4, **kw))
    want = _expected([gen(images[i % len(images)], index=i) for i in range(9)])
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not torch.equal(got[0], got[1])  # the anomalies are there


def test_anomaly_samples_refuses_what_it_can_not_use(normals_dir):
    gen = FractalAnomaly(config=CFG, size=40, seed=0)
    with pytest.raises(ValueError, match="FractalAnomaly generator"):
        AnomalySamples([np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        AnomalySamples([], gen, length=4)
    samples = AnomalySamples([np.full((30, 30), 90, np.uint8)], gen, length=2)
    with pytest.raises(IndexError, match="out of range"):
        samples[2]
    assert samples[1][0].shape == (3, 40, 40)
