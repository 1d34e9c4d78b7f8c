"""``fit``: train FractalAD from a shard dataset, resumably, on CPU, one GPU or many (DDP).

The schedule is counted in optimizer steps; ``epochs`` converts with the paper's epoch of 391
samples. Batch ``k`` of an epoch is fixed by (seed, epoch), so a resumed run takes exactly the
batches an uninterrupted one would; with a longer schedule, a resume extends a finished run as
if it had been asked for the longer one at the start. Run folder: ``config.json``, ``metrics.csv``,
``checkpoint.pt`` (periodic, for ``--resume``) and ``model.pt`` (final and self-contained, teacher
included, for test / predict / export).
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

from fractalsynth.shards import load_holdout

from . import __version__
from .data import (DeviceNormals, RecordBatches, batch_order, make_loader, random_flips,
                   random_zoom, show_clean)
from .choices import COMPILE_MODES
from .model import FractalAD

PAPER_EPOCH_SAMPLES = 391
RUN_SCHEMA = "fractalad.run"
RUN_VERSION = 1
HOLDOUT_FILE = "holdout_normals.npz"  # the shard set's held-out normals, for calibration


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last checkpoint is left as it was."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped ``fit`` after a whole step, which ``checkpoint.pt`` now holds."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def stop_requests(enabled: bool = True):
    """Within: SIGINT and SIGTERM set ``flag["signum"]`` for the loop to read after each step;
    a second Ctrl-C stops at once. Off the main thread, or not ``enabled``, nothing changes;
    a signal the process was started to ignore stays ignored."""
    flag = {"signum": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def ask(signum, frame):
        if flag["signum"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signum"] = signum

    # a shell starts a script's background jobs with SIGINT ignored, so that the Ctrl-C meant
    # for the script does not stop them: keep that
    before = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)
              if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield flag
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@dataclass
class FitConfig:
    """Training settings; defaults are the paper's."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    pretrained: bool = True  # False: random teacher (timing only)
    kd: bool = True
    head_width: int | None = None  # None: the smallest stage width, as in the method
    clean_share: float = 0.0  # share of samples shown without their anomaly (the paper: 0)
    flips: bool = False  # random horizontal / vertical flips of each sample (the paper: none)
    zoom: float = 1.0  # each sample magnified by a random factor in [1, zoom] (the paper: 1, none)
    input_blur: float = 0.0  # Gaussian sigma (pixels) on every input, in training and inference
    decay_steps: int = 0  # the last N steps lower the learning rate linearly to 0 (the paper: 0)
    ema: float = 0.0  # > 0: the run's weights are this moving average of the trained ones (paper: 0)
    epochs: float = 100.0
    steps: int | None = None  # overrides epochs
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-3
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    bf16: bool = True  # autocast to bf16 on CUDA
    cpu_bf16: bool = False  # and on CPUs that compute it natively (1.5-2.1x; scored a little lower)
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode; 'reduce-overhead' adds CUDA graphs
    cuda_graph: bool = False  # capture the step once, replay it (one GPU, static shapes)
    channels_last: bool = True
    hold_memory: bool = True  # CPU: glibc keeps freed tensor memory (hold_freed_memory; 2.8x at 256 px)
    checkpoint_every: int = 500
    log_every: int = 25

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a positive number, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("batch_size, log_every and checkpoint_every must be >= 1")
        if not 0.0 <= self.clean_share < 1.0:
            raise ValueError(f"clean_share must be in [0, 1), got {self.clean_share}")
        if not 0.0 <= self.input_blur <= 8.0:
            raise ValueError(f"input_blur must be in [0, 8], got {self.input_blur}")
        if not 1.0 <= self.zoom <= 4.0:
            raise ValueError(f"zoom must be in [1, 4], got {self.zoom}")
        if self.decay_steps < 0:
            raise ValueError(f"decay_steps must be >= 0, got {self.decay_steps}")
        if self.decay_steps > self.total_steps():
            raise ValueError(f"decay_steps ({self.decay_steps}) is longer than the run's "
                             f"{self.total_steps()} steps; lower --decay-steps or raise --steps "
                             "/ --epochs")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) (0: off; e.g. 0.998), got {self.ema}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got "
                             f"{self.compile_mode!r}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError("--compile-mode needs --compile")
        if self.decay_steps and self.compile:
            # a compiled step would keep the rate it was traced with (or recompile for each one)
            raise ValueError("--decay-steps and --compile exclude each other; use --cuda-graph")

    def learning_rate(self, step: int) -> float:
        """The rate of update ``step`` (0-based): constant, then the linear decay to 0."""
        left = self.total_steps() - step
        if self.decay_steps and left <= self.decay_steps:
            return self.lr * left / (self.decay_steps + 1)
        return self.lr

    def total_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(self.epochs * PAPER_EPOCH_SAMPLES / self.batch_size))


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a clear error for an unavailable choice."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no GPU; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    # elsewhere oneDNN would emulate bf16: not measured, so such CPUs keep float32
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def hold_freed_memory() -> bool:
    """Make glibc keep freed CPU memory for reuse instead of returning it; True if it took."""
    # glibc serves blocks over 32 MB (a 256 px batch's activations) with fresh mmap pages and
    # unmaps them on free, so every step faults in gigabytes of zeroed pages again: on a 2-core VM
    # the step ran 2.8x slower, the CPU busy in the kernel. The cost: the process keeps its peak.
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: other C libraries read these differently
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        return False


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device):
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return device


class WeightAverage:
    """An exponential moving average of the student's and head's weights (``fit --ema``).

    Step t moves the average by 1 - min(decay, (1 + t) / (10 + t)) towards the trained weights,
    so the first steps, whose weights are far from the end, weigh little. Batch-norm statistics
    are averaged like the weights; the teacher is frozen and left out.
    """

    def __init__(self, model: FractalAD, decay: float):
        self.decay = decay
        live = model.trainable_state()  # views of the live tensors: in-place updates show through
        self.state = {k: v.detach().clone() for k, v in live.items()}
        floats = [k for k, v in live.items() if v.is_floating_point()]
        self._pairs = ([self.state[k] for k in floats], [live[k] for k in floats])
        self._counters = [(self.state[k], live[k]) for k in live if k not in floats]

    def rate(self, step: int) -> float:
        """How far update ``step`` (1-based) moves the average towards the trained weights."""
        return 1.0 - min(self.decay, (1 + step) / (10 + step))

    def update(self, step: int) -> None:
        torch._foreach_lerp_(*self._pairs, self.rate(step))  # no host sync: a float weight
        for mine, live in self._counters:
            mine.copy_(live)

    def load(self, state: dict) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)


class Trainer:
    """Holds the model, optimizer and data path of one run; ``step`` is one optimizer update."""

    def __init__(self, shards_dir: str, cfg: FitConfig, device: torch.device | None = None):
        from fractalsynth.shards import ShardDataset
        self.cfg = cfg
        self.device = device or pick_device(cfg.device)
        self.rank, self.world = _dist_info()
        if cfg.cuda_graph:  # before any loading: a wrong option should fail at once
            _check_cuda_graph(cfg, self.device, self.world)
        if self.device.type == "cpu" and cfg.hold_memory:
            hold_freed_memory()
        torch.manual_seed(cfg.seed)
        self.shards = ShardDataset(shards_dir)
        self.shards.check_files()
        self.batches = RecordBatches(self.shards, cfg.batch_size)
        self.normals = DeviceNormals(self.shards, self.device)
        self.model = FractalAD(cfg.backbone, cfg.kd, cfg.weights, cfg.pretrained,
                               cfg.head_width, cfg.input_blur).to(self.device)
        self.model.train()
        self.bf16 = cfg.bf16 and (self.device.type == "cuda" or (cfg.cpu_bf16 and native_bf16(self.device)))
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True
        if cfg.channels_last:  # 1.9x on an H100 (bf16), 1.1-1.7x on the CPU (oneDNN)
            self.model = self.model.to(memory_format=torch.channels_last)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self._rate_holder(cfg.lr), weight_decay=cfg.weight_decay,
                                     fused=cuda or None, capturable=cfg.cuda_graph)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None)
        self._step_fn = self._train_step
        if cfg.compile:
            self._step_fn = torch.compile(self._train_step, mode=cfg.compile_mode)
        elif cfg.cuda_graph:
            self._step_fn = GraphedStep(self._update, self.opt)
        self.step_count = 0
        self._step_rng = torch.Generator(device=self.device)
        self.average = WeightAverage(self.model, cfg.ema) if cfg.ema else None

    def _rate_holder(self, rate: float):
        """The optimizer's learning rate: a float, or a GPU scalar that a captured step reads."""
        # a float is baked into the captured kernels; a device tensor is read at each replay,
        # so --decay-steps can lower it in place between replays
        return torch.tensor(float(rate), device=self.device) if self.cfg.cuda_graph else float(rate)

    def _set_learning_rate(self, rate: float) -> None:
        for group in self.opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(rate)  # in place, no host sync: the graph keeps its pointer
            else:
                group["lr"] = rate

    def _train_step(self, normal, anomalous, mask):
        self.opt.zero_grad(set_to_none=True)
        return self._update(normal, anomalous, mask)

    def _update(self, normal, anomalous, mask):
        """Forward, backward and optimizer step on zeroed (or capture-fresh) gradients."""
        # autocast's weight-cast cache would hold tensors made outside a captured graph
        with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cfg.cuda_graph,
                            enabled=self.bf16):
            total, kd, seg = self.net(anomalous, normal, mask)
        total.backward()
        self.opt.step()
        return total.detach(), kd, seg

    def to_inputs(self, batch):
        normal, anomalous, mask = self.normals.rebuild(batch)
        if self.cfg.clean_share > 0 or self.cfg.flips or self.cfg.zoom > 1:
            # seeded by (seed, rank, step): a resumed run draws what an uninterrupted one would
            key = np.random.SeedSequence([self.cfg.seed, self.rank, self.step_count]).generate_state(1)
            self._step_rng.manual_seed(int(key[0]))
        if self.cfg.clean_share > 0:
            anomalous, mask = show_clean(normal, anomalous, mask, self.cfg.clean_share, self._step_rng)
        if self.cfg.flips:
            normal, anomalous, mask = random_flips((normal, anomalous, mask), self._step_rng)
        if self.cfg.zoom > 1:
            normal, anomalous, mask = random_zoom((normal, anomalous, mask), self.cfg.zoom, self._step_rng)
        if self.cfg.channels_last:
            normal = normal.contiguous(memory_format=torch.channels_last)
            anomalous = anomalous.contiguous(memory_format=torch.channels_last)
        return normal, anomalous, mask

    def step(self, batch):
        """One optimizer update from a loader batch; returns device scalars (no host sync)."""
        if self.cfg.decay_steps:
            self._set_learning_rate(self.cfg.learning_rate(self.step_count))
        out = self._step_fn(*self.to_inputs(batch))
        self.step_count += 1
        if self.average:
            self.average.update(self.step_count)
        return out

    def batches_from(self, start_step: int, total: int, workers: int):
        """Loader batches for steps ``start_step`` .. ``total - 1``, epoch by epoch."""
        n = len(self.batches)
        per_rank = max(1, n // self.world)
        step = start_step
        while step < total:
            epoch, offset = divmod(step, per_rank)
            order = batch_order(n, self.cfg.seed, epoch, self.rank, self.world)[:per_rank]
            order = order[offset:offset + (total - step)]
            for batch in make_loader(self.batches, order, workers):
                yield batch
                step += 1

    def state(self) -> dict:
        optimizer = self.opt.state_dict()
        for group in optimizer["param_groups"]:  # a plain number: the checkpoint loads anywhere
            group["lr"] = float(group["lr"])
        state = {"model": self.model.trainable_state(), "optimizer": optimizer,
                 "step": self.step_count, "config": asdict(self.cfg)}
        if self.average:
            state["ema"] = self.average.state
        return state

    def final_weights(self) -> dict:
        """The run's weights, teacher included: the moving average under ``--ema``."""
        weights = self.model.state_dict()
        if self.average:
            weights.update(self.average.state)
        return weights

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        flags = {k: self.opt.param_groups[0][k] for k in ("fused", "capturable")}
        self.opt.load_state_dict(state["optimizer"])
        # saved groups carry the flags of the run that saved them (captured or eager, GPU or
        # CPU); this run's optimizer keeps its own, and its step counts live where they expect
        on_device = bool(flags["fused"] or flags["capturable"])
        for group in self.opt.param_groups:
            group.update(flags)
            group["lr"] = self._rate_holder(group["lr"])
        for param, slot in self.opt.state.items():
            if "step" in slot:
                slot["step"] = slot["step"].to(device=param.device if on_device else "cpu", dtype=torch.float32)
        self.step_count = int(state["step"])
        if self.average:
            self.average.load(state["ema"])
        if isinstance(self._step_fn, GraphedStep):
            self._step_fn.reset()  # a captured graph would keep updating the replaced state


def _check_cuda_graph(cfg: FitConfig, device: torch.device, world: int) -> None:
    if device.type != "cuda":
        raise ValueError("--cuda-graph needs a GPU (--device cuda); drop it on the CPU")
    if cfg.compile:
        raise ValueError("--cuda-graph and --compile exclude each other; choose one")
    if world > 1:
        raise ValueError("--cuda-graph runs on one GPU; drop it under torchrun")


class GraphedStep:
    """A training update captured once as a CUDA graph and replayed for every later batch.

    The first ``warmup`` calls run eagerly on a side stream (real updates, which also let
    cuDNN and the fused optimizer allocate their state); the next call captures the update on
    static copies of its inputs and replays it. Later calls copy the batch into those copies
    and replay: one launch instead of hundreds, which is what a launch-bound step needs.
    """

    def __init__(self, update, optimizer, warmup: int = 3):
        self.update, self.opt, self.warmup = update, optimizer, warmup
        self.reset()

    def reset(self) -> None:
        """Forget the captured graph (after the optimizer state or weights were replaced)."""
        self.graph, self.inputs, self.outputs, self.calls = None, None, None, 0

    def __call__(self, *inputs):
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.zero_grad(set_to_none=True)
                out = self.update(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.inputs = [x.clone() for x in inputs]
            self.opt.zero_grad(set_to_none=True)  # backward inside the capture makes static grads
            self.graph = torch.cuda.CUDAGraph()
            # thread-local: the loader's pin-memory thread may touch CUDA during the capture
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.update(*self.inputs)
        else:
            for static, x in zip(self.inputs, inputs):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter and buffer is finite (one host sync)."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def write_whole(path: str, write, tmp_suffix: str = ".partial") -> None:
    """``write(tmp)``, then rename it onto ``path``: no reader (a DDP rank, a resume) sees half."""
    tmp = path + tmp_suffix
    write(tmp)
    os.replace(tmp, path)


def _atomic_save(obj, path):
    write_whole(path, lambda tmp: torch.save(obj, tmp))


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` to ``path`` as JSON, whole or not at all."""
    def dump(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
    write_whole(path, dump)


# a resume may change these: the schedule (steps, epochs, decay) as long as the steps already
# taken keep their learning rates, so N steps and then M more equal N + M in one go; the rest
# set how a run executes or reports (a run captured on a GPU may go on eager, or on the CPU)
RESUME_MAY_CHANGE = ("epochs", "steps", "decay_steps", "workers", "log_every", "checkpoint_every",
                     "device", "compile", "compile_mode", "cuda_graph", "bf16", "cpu_bf16",
                     "hold_memory")


def _save_holdout(shards_dir: str, path: str) -> None:
    """Copy the shard set's held-out normals into the run, so the run calibrates on its own."""
    held = load_holdout(shards_dir)
    if len(held.images):  # np.savez appends .npz to a name without it
        extra = {} if held.layout is None else {"layout": held.layout}
        write_whole(path, lambda tmp: np.savez(tmp, images=held.images, names=np.array(held.names),
                                               **extra), ".partial.npz")


def _saved_config(config: dict) -> FitConfig:
    """A checkpoint's settings; one an older checkpoint lacks had its default then."""
    known = {f.name for f in fields(FitConfig)}
    return FitConfig(**{k: v for k, v in config.items() if k in known})


def _diverged(out_dir: str, ckpt: str, saved_step: int | None, what: str):
    kept = f"{ckpt} keeps step {saved_step}" if saved_step is not None else "no checkpoint was saved"
    raise TrainingDiverged(f"{out_dir}: training diverged ({what}); {kept}, and no model.pt was "
                           "written; start a new run with a lower --lr")


def run_metadata(cfg: FitConfig, shards_dir: str, trainer: Trainer) -> dict:
    return {"schema": RUN_SCHEMA, "version": RUN_VERSION, "fractalad_version": __version__,
            "fit": asdict(cfg), "shards": os.path.abspath(shards_dir),
            "size": trainer.shards.size, "channels": trainer.shards.channels,
            "shards_params_hash": trainer.shards.manifest["params_hash"],
            # > 0: the normals were cut into pieces of this width / height; test images are too
            "piece_aspect": float(trainer.shards.params.get("piece_aspect", 0.0)),
            # what the steps ran in: fit.bf16 / fit.cpu_bf16 ask, the device decides (native_bf16)
            "autocast": "bfloat16" if trainer.bf16 else "float32",
            # float sums depend on how a step's work is split: the same seed repeats the same
            # weights only with the same torch and, on the CPU, the same number of threads
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def fit(shards_dir: str, out_dir: str, cfg: FitConfig, resume: bool = False, progress=True,
        log=print) -> dict:
    """Train and write the run folder; returns a summary (steps, seconds, samples/s, last loss).

    With ``progress``, rank 0 shows a progress bar and first says what it runs through ``log``.
    """
    device = init_distributed(pick_device(cfg.device))
    trainer = Trainer(shards_dir, cfg, device)
    rank = trainer.rank
    os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    meta = run_metadata(cfg, shards_dir, trainer)
    if resume:
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"{ckpt}: nothing to resume; drop --resume to start afresh")
        try:
            state = torch.load(ckpt, map_location=device, weights_only=False)
            saved_config = dict(state["config"])
        except Exception as e:  # a file cut short or damaged outside fit (fit replaces it whole)
            raise ValueError(f"{ckpt}: unreadable ({type(e).__name__}); restore it from a copy, "
                             "or drop --resume and choose another --out") from None
        before = _saved_config(saved_config)
        old, new = asdict(before), asdict(cfg)
        changed = sorted({k for k in new if k not in RESUME_MAY_CHANGE and old[k] != new[k]}
                         | (set(saved_config) - set(new)))  # a newer version's settings too
        if changed:
            raise ValueError(f"{ckpt} was made with other settings ({', '.join(changed)}); "
                             "resume with the same options")
        step, total = int(state["step"]), cfg.total_steps()
        if step > total:
            raise ValueError(f"{ckpt} is at step {step}, past the {total} asked for; ask for at "
                             "least as many (--steps / --epochs)")
        first = next((k for k in range(step) if before.learning_rate(k) != cfg.learning_rate(k)), None)
        if first is not None:
            raise ValueError(f"{ckpt} is at step {step}, but this schedule changes the learning "
                             f"rate of its step {first}; keep the run's --steps / --epochs / "
                             f"--decay-steps, or start the decay at step {step} or later")
        with open(os.path.join(out_dir, "config.json")) as fh:
            if json.load(fh).get("shards_params_hash") != meta["shards_params_hash"]:
                raise ValueError(f"{out_dir} was trained on another shard dataset than "
                                 f"{shards_dir}; resume with the same shards")
        trainer.load_state(state)
    elif os.path.isfile(os.path.join(out_dir, "model.pt")) or os.path.isfile(ckpt):
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it or "
                              "choose another --out")
    if rank == 0:
        write_json(os.path.join(out_dir, "config.json"), meta)
        _save_holdout(shards_dir, os.path.join(out_dir, HOLDOUT_FILE))
    total, start = cfg.total_steps(), trainer.step_count
    metrics_path = os.path.join(out_dir, "metrics.csv")
    new_csv = not (resume and os.path.exists(metrics_path))
    csv_fh = open(metrics_path, "a" if not new_csv else "w", newline="") if rank == 0 else None
    writer = csv.writer(csv_fh) if csv_fh else None
    if writer and new_csv:
        writer.writerow(["step", "epoch", "loss", "kd", "seg", "samples_per_s", "seconds"])
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        where = f"the CPU ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
        per_step = f"batch {cfg.batch_size}" + (f" on each of {trainer.world} ranks" if trainer.world > 1 else "")
        steps = f"training steps {start + 1}-{total}" if start < total else "no steps left to train"
        log(f"{out_dir}: {f'resuming after step {start}, ' if resume else ''}{steps} ({per_step}), "
            f"{cfg.backbone} {'with distillation' if cfg.kd else 'in texture mode'}, "
            f"{trainer.shards.size} px, on {where}, {meta['autocast']}")
        bar = tqdm(total=total, initial=trainer.step_count, desc="fit", unit="step", dynamic_ncols=True)
    sums = torch.zeros(3, device=device)
    count = 0
    t0 = time.perf_counter()
    t_log = t0
    saved_step = start if resume else None  # the step checkpoint.pt holds
    last = {}
    # a stop mid-step (mid optimizer update) would leave no sound state to save, so a signal is
    # only noted and the loop stops after the step. Under DDP ranks could stop a step apart and
    # hang, so they keep the default: the last periodic checkpoint
    with stop_requests(trainer.world == 1) as stop:
        for batch in trainer.batches_from(start, total, cfg.workers):
            total_l, kd, seg = trainer.step(batch)
            sums += torch.stack([total_l.float(), kd.float(), seg.float()])
            count += 1
            s = trainer.step_count
            if s % cfg.log_every == 0 or s == total:
                if trainer.world > 1:  # every rank logs, and checks, the mean over all ranks
                    dist.all_reduce(sums)
                    sums /= trainer.world
                vals = (sums / count).tolist()  # the only host sync, every log_every steps
                if not all(math.isfinite(v) for v in vals):
                    _diverged(out_dir, ckpt, saved_step, f"the mean loss of steps {s - count + 1}-{s} is {vals[0]}")
                now = time.perf_counter()
                rate = count * cfg.batch_size * trainer.world / max(now - t_log, 1e-9)
                last = {"step": s, "loss": vals[0], "kd": vals[1], "seg": vals[2]}
                if writer:
                    writer.writerow([s, round(s * cfg.batch_size / PAPER_EPOCH_SAMPLES, 3),
                                     *(round(v, 6) for v in vals), round(rate, 1), round(now - t0, 2)])
                    csv_fh.flush()
                if bar:
                    bar.set_postfix(loss=f"{vals[0]:.4f}", kd=f"{vals[1]:.3f}", seg=f"{vals[2]:.3f}",
                                    sps=f"{rate:.0f}")
                sums.zero_()
                count = 0
                t_log = now
            if bar:
                bar.update(1)
            stopping = stop["signum"] is not None and s < total
            if s % cfg.checkpoint_every == 0 or s == total or stopping:
                # a checkpoint is only ever replaced by a sound one (an update can overflow the
                # weights while its own loss is still finite); every rank checks, so all stop together
                if not weights_finite(trainer.model):
                    _diverged(out_dir, ckpt, saved_step, f"the weights after step {s} are not finite")
                if rank == 0:
                    _atomic_save(trainer.state(), ckpt)
                saved_step = s
            if stopping:
                break
    seconds = time.perf_counter() - t0
    if bar:
        bar.close()
    if csv_fh:
        csv_fh.close()
    if stop["signum"] is not None and trainer.step_count < total:
        name = signal.Signals(stop["signum"]).name
        raise TrainingInterrupted(f"{out_dir}: stopped by {name} after step {trainer.step_count} of "
                                  f"{total}; {ckpt} holds it: run the same command with --resume "
                                  "to continue", stop["signum"])
    if rank == 0:
        # the full state, teacher included: test / predict need neither --weights nor a network;
        # under --ema the averaged weights, with the trained ones beside them (load_run(trained=True))
        final = {"meta": meta, "model": trainer.final_weights()}
        if trainer.average:
            final["trained"] = trainer.model.trainable_state()
        _atomic_save(final, os.path.join(out_dir, "model.pt"))
    done = trainer.step_count - start
    return {"steps": trainer.step_count, "seconds": seconds, "autocast": meta["autocast"],
            "samples_per_s": done * cfg.batch_size * trainer.world / max(seconds, 1e-9), **last}
