"""Shared plumbing for the three method scripts (maem_gan.py, invert_gan.py, pgm_gan.py).

Nothing in this file is specific to one paper's method: only the things every script needs
(runtime / DDP, checkpoints, logging, pictures, datasets, network architectures, and the
Inception-based and mode-coverage metrics). A reader who wants the *method* should open the
method script; a reader who wants to know *how* a batch reaches the GPU comes here.

Contents: the sections, each with its line range (tests/test_common.py checks the ranges against
the `# ====` headers: move a section, update its line here):
    0. Errors          45-140      UsageError and run_cli: bad input -> one line on stderr, exit 2
    1. Runtime         141-495     device, torchrun/DDP, seeds, AMP, TF32, threads, torch.compile,
                                   shutdown; SIGINT/SIGTERM handlers and the ranks' agreement to stop
    2. Checkpoints     496-666     atomic save, weights_only load, a run's sampling G, RNG state
    3. Logging         667-1100    args.json, log.jsonl, console line with it/s and ETA; the CLI's
                                   shared flags and checks; RunControl: a training loop's stop on a
                                   signal, checkpoints, train_seconds, first lines
    4. Pictures        1101-1281   image grids and 2-D scatter plots (PIL only)
    5. Datasets        1282-2259   synthetic ring/grid, torchvision datasets, stacked MNIST, folders,
                                   BatchStream; then the pieces of multi-stage runs: --help's presets
                                   epilog, stage planning, SimCLR (Eq. 4 of PGMGAN), kNN graph,
                                   clustering metrics
    6. Architectures   2260-3585   MLP, DCGAN, SNGAN/BigGAN-style ResNets, InvertGAN's ResNet G/F,
                                   StyleGAN2, EMA
    7. Metrics         3586-END    FID Inception, VGG-16, FID/IS/Mode Score/KID/PR/PRD/I-Variance,
                                   samples of G in chunks (generate), a run's final metrics
                                   (run_*_metrics), mode coverage

Heavy optional imports (torchvision, scipy, PIL) are done inside the functions that need them,
so `import common` stays fast (it only pays for `import torch`).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


# ==================================================================================================
# 0. Errors
# ==================================================================================================


class UsageError(Exception):
    """Bad input from the user (unknown dataset, empty folder, corrupt file, ...).

    Raised anywhere; `run_cli` turns it into one line on stderr and exit code 2, with no
    traceback. Raise it *before* anything is written, so nothing is left half-done.
    """


class Interrupted(BaseException):
    """SIGINT / SIGTERM that stops the process at once: outside a training loop, or a second signal
    inside one (the first only asks the loop to stop, see RunControl). A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` swallows it."""

    def __init__(self, signum, second=False):
        super().__init__(signum)
        self.signum, self.second = signum, second


def prints_here():
    """True on the process that prints errors: one per node (LOCAL_RANK 0, or a plain launch). Under
    torchrun every rank meets the same bad flag, and each node's console needs the line once."""
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


def say(line):
    """One line on stderr, from the printing process only (see prints_here)."""
    if prints_here():
        print(line, file=sys.stderr, flush=True)


class _QuietDefaults(argparse.HelpFormatter):
    """'(default: X)' only where it tells something: not after None (a preset or a rule fills the
    flag; the presets are listed at the end of --help), not after a switch's False, and not after
    help text that already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class ArgParser(argparse.ArgumentParser):
    """argparse with the project's conventions: a bad flag gives one line and exit code 2 (argparse
    itself prints the whole usage block first), and --help shows a default only where it says
    something (_QuietDefaults, mixed into whatever formatter the script asks for)."""

    def __init__(self, *args, formatter_class=argparse.HelpFormatter, **kwargs):
        if not issubclass(formatter_class, _QuietDefaults):
            formatter_class = type(formatter_class.__name__, (_QuietDefaults, formatter_class), {})
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        say(f"error: {message} (see --help)")
        sys.exit(2)


def run_cli(main_fn, argv=None):
    """Call `main_fn(argv)` as a command. A UsageError becomes `error: <message>` on stderr and exit
    code 2. SIGINT / SIGTERM: a training loop finishes its step, saves and exits 130 / 143
    (RunControl); anywhere else, or a second signal, the process stops at once with one line
    (what is on disk) and the same exit codes, without a traceback."""
    previous = install_stop_signals()
    try:
        return main_fn(argv)
    except UsageError as err:
        say(f"error: {err}")
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as err:
        _STOP.exiting = True
        signum = getattr(err, "signum", signal.SIGINT)
        verb = "aborted at once by a second" if getattr(err, "second", False) else "interrupted by"
        say(f"{verb} {signal.Signals(signum).name}" + (f"; {_STOP.note}" if _STOP.note else ""))
        sys.exit(128 + signum)
    except Exception as err:
        if not _STOP.requested:
            raise
        # A stop was asked for and then a collective failed: torchrun stops the other ranks with
        # SIGTERM when one of them has failed, so its error (not this one) is the cause.
        signum, _STOP.exiting = _STOP.requested, True
        say(f"stopped by {signal.Signals(signum).name} ({type(err).__name__} meanwhile: another "
            f"process failed?)" + (f"; {_STOP.note}" if _STOP.note else ""))
        sys.exit(128 + signum)
    finally:
        gc.collect()    # free DDP and the gloo group while Python is alive (README, "Launching")
        # A torchrun worker on its way out after a stop ignores later signals: torchrun sends
        # SIGTERM to the ranks still tearing down once one has exited (143 would become a kill).
        leaving = _STOP.exiting and "LOCAL_RANK" in os.environ
        restore_signals({sig: signal.SIG_IGN for sig in previous} if leaving else previous)


# ==================================================================================================
# 1. Runtime
# ==================================================================================================

import contextlib
import datetime
import gzip
import inspect
import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass

import numpy as np


def _env_int(name, default):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


@dataclass
class Runtime:
    """Where and how this process runs. Built once by `setup_runtime`, passed everywhere.

    `rank`/`world_size` are the global torchrun values (0/1 for a plain `python` launch);
    `is_main` is True on exactly one process: only it logs, draws samples and saves.
    """

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False
    amp: str = "none"          # none | bf16 | fp16
    compile: bool = False      # wrap networks with torch.compile
    scaler: object = None      # torch.amp.GradScaler for fp16, else None
    stop_group: object = None  # the gloo group on which RunControl's ranks agree to stop
    train_seconds: float = None  # training time of the run over all its processes (RunControl)

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        """Mixed-precision context for forward passes (a no-op with --amp none).

        bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 does (see `scaler`).
        """
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward_step(self, loss, optimizer):
        """loss.backward() + optimizer.step(), through the GradScaler when --amp fp16."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def wrap(self, module):
        """Put `module` on the device, optionally torch.compile it, and wrap it in DDP.

        GAN-specific DDP rules the method scripts follow (they matter for correctness):
        - No buffer sync at forwards (`forward_sync_buffers=False`; `broadcast_buffers=False`
          before torch has it): spectral-norm power-iteration vectors and BN running stats are
          buffers; re-broadcasting them from rank 0 at every forward would overwrite them in the
          middle of a step (two forwards before one backward). Each rank keeps its own copy; they
          only affect evaluation, and rank 0's copy is the one that is saved. The one sync at
          wrapping copies rank 0's buffers, equal on every rank then (same seed).
        - Run the *wrapped* network only in the step that trains it (its backward all-reduces
          its gradients); elsewhere call `unwrap(net)` (e.g. D inside G's loss), so no rank
          waits for a gradient reduction that never comes.
        """
        module = module.to(self.device)
        if self.compile:
            module = torch.compile(module)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.local_rank] if self.device.type == "cuda" else None
            no_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
            module = DDP(module, device_ids=ids, **no_sync)
        return module

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def all_mean(self, tensor):
        """Average a tensor over ranks (for logging: every rank contributes its batch)."""
        if self.distributed:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
            tensor /= self.world_size
        return tensor


def lr_factor(step, steps, decay_from):
    """Multiplier of the lr at `step` (0-based) of `steps`: 1 until decay_from * steps, then linear
    to 0 at `steps` (ours, the 2-D schedules of invert_gan.py and pgm_gan.py: the papers give
    none). A function of the step alone, so a resumed run gets the same values."""
    start = decay_from * steps
    if step < start or decay_from >= 1:
        return 1.0
    return max(0.0, (steps - step) / (steps - start))


def d_lr(args):
    """D's learning rate: --lr-d where a script has it and it is given, else --lr."""
    return args.lr if getattr(args, "lr_d", None) is None else args.lr_d


def set_lr(optimizers, lr):
    """Write `lr` into every param group of the given optimizers (None entries skipped)."""
    for opt in optimizers:
        for group in (opt.param_groups if opt is not None else ()):
            group["lr"] = lr


def adam(params, lr, betas=(0.9, 0.999), **kwargs):
    """torch.optim.Adam with the fused kernel where this torch has it (CUDA; CPU since 2.4).

    The update is Adam's; fused runs it as one kernel over all tensors instead of ~10 small ops
    per tensor, which on the small 2-D networks is most of a training step (measured here:
    2.0 ms vs 6.9 ms per step for a 33K-parameter MLP on a busy CPU core).
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):   # older torch / unsupported device
        return torch.optim.Adam(params, lr=lr, betas=betas, **kwargs)


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name):
    """torch.device for --device auto|cpu|cuda (auto = CUDA when visible); one line if cuda is
    asked for and none is visible."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown --device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available())
                        else "cpu")


def setup_runtime(device="auto", amp="none", seed=0, compile=False, threads=0):
    """Choose the device, join the torchrun process group if launched by torchrun, set AMP and the
    number of CPU threads (`threads` > 0; 0 leaves torch's default, see `--threads`).

    torchrun exports RANK, WORLD_SIZE and LOCAL_RANK; a plain `python` launch has none of them.
    NCCL is the backend on CUDA, gloo on CPU. Every rank is seeded with the *same* `seed` here,
    so networks built next start from identical weights (DDP also broadcasts rank 0's weights);
    call `seed_rank(rt, seed)` after building them to give each rank its own noise stream.
    """
    if amp not in ("none", "bf16", "fp16"):
        raise UsageError(f"unknown --amp {amp!r}: choose none, bf16 or fp16")
    use_cuda = pick_device(device).type == "cuda"
    if threads:
        torch.set_num_threads(threads)

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if use_cuda:
        if distributed:
            torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
        # TF32 matmuls/convs on Ampere+: ~2x faster, 10-bit mantissa; standard for GANs.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        dev = torch.device("cpu")
    if amp == "fp16" and not use_cuda:
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        # device_id (bind NCCL to this rank's GPU at once) is torch >= 2.3; older: bound lazily.
        kwargs = {}
        if use_cuda and "device_id" in inspect.signature(torch.distributed.init_process_group).parameters:
            kwargs["device_id"] = dev
        torch.distributed.init_process_group(backend=backend, **kwargs)

    scaler = None
    if amp == "fp16":   # torch.amp.GradScaler is torch >= 2.3; torch.cuda.amp's before that
        scaler = (torch.amp.GradScaler(dev.type) if hasattr(torch.amp, "GradScaler")
                  else torch.cuda.amp.GradScaler())
    seed_everything(seed)
    return Runtime(device=dev, rank=rank, local_rank=local_rank, world_size=world_size,
                   distributed=distributed, amp=amp, compile=compile, scaler=scaler)


def seed_rank(rt, seed):
    """Per-rank RNG streams (noise, augmentation) once the shared-weight networks are built.

    Rank 0 gets `seed` itself, so a 1-process run and rank 0 of a torchrun job draw the same z.
    """
    seed_everything(seed + 1_000_003 * rt.rank)


class _AllGatherGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the sum over ranks of the gradients
    of its own rows (every rank's loss may depend on every rank's rows)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = torch.distributed.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_grad(x):
    """(n, ...) on each of W ranks -> (W n, ...), rank order, gradients flowing back to each rank's
    own x (torch.distributed.all_gather alone cuts them). Every rank must pass the same shape
    (BatchStream gives every rank batch_size / world_size rows) and call backward.

    For a loss of the whole global batch (InvertGAN's mu and Sigma of F(x)): a per-rank estimate
    would be another objective (8 codes cannot estimate a 20-d covariance), so every rank gathers
    all rows and holds the same loss, and N processes minimise what one process would with the same
    global batch. Gradient scale: the backward sums the W ranks' (equal) gradients of each row, so
    a rank's rows receive W x the one-process gradient; DDP's average over ranks then divides by W,
    and the weight gradients equal one process's."""
    return _AllGatherGrad.apply(x)


def shutdown(rt):
    """Leave the process group cleanly (torchrun otherwise prints warnings at exit)."""
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def add_runtime_args(parser):
    """The launch flags every method script shares (CLI contract in METHODS.md)."""
    g = parser.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=0, help="random seed (same weights on all ranks)")
    g.add_argument("--out", default=None, help="output folder (default runs/<method>-<dataset>-<seed>)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = CUDA when visible, else CPU")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="mixed precision for forward passes (fp16 adds a GradScaler)")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/ckpt.pt (a finished run is only evaluated again)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank (image folders)")
    g.add_argument("--log-every", type=int, default=None, help="log (and check losses are finite) every N steps")
    g.add_argument("--sample-every", type=int, default=None, help="save a sample picture every N steps")
    g.add_argument("--ckpt-every", type=int, default=None, help="write OUT/ckpt.pt every N steps (a multiple of --log-every), at the last step "
                        "and when Ctrl-C / SIGTERM stops the run after its step")
    g.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    g.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process: by default 1 for the 2-D presets (their small MLPs run "
                        "no faster on more, and much slower beside other busy processes) unless "
                        "OMP_NUM_THREADS is set, else torch's default; 0 = torch's default")
    return g


# What --data-root defaults to (common.default_data_root), for every --help that has the flag.
DATA_ROOT_HELP = ("dataset folder (default: depends on the dataset: data/mnist for (stacked-)mnist, "
                  "/usr/share/datasets/fashion-mnist if present for (stacked-)fashion-mnist, else "
                  "data/<dataset>; README, Datasets)")


def default_threads(args):
    """--threads left unset: 1 for 2-D data unless the user set OMP_NUM_THREADS, else 0 (torch's
    default). The 2-D networks are too small for intra-op parallelism to pay for its spinning."""
    if args.threads is not None:
        return args.threads
    points = DATASETS.get(args.dataset, {}).get("kind") == "points"
    return 1 if points and not os.environ.get("OMP_NUM_THREADS") else 0


# --- Stopping: SIGINT / SIGTERM ------------------------------------------------------------------
class _StopState:
    """What SIGINT / SIGTERM do in this process (one instance, _STOP)."""
    deferring = False     # a RunControl loop runs: a first signal only asks it to stop after the step
    requested = 0         # the number of that signal (0: none)
    exiting = False       # on the way out (saved, or told why): further signals are ignored
    step_seconds = 0.0    # the loop's seconds per step, so that a slow step can say why it waits
    note = ""             # what is on disk, for the line printed when the process stops at once


_STOP = _StopState()


def _on_stop_signal(signum, frame):
    if _STOP.exiting:
        return
    if _STOP.deferring and not _STOP.requested:
        _STOP.requested = signum
        if _STOP.step_seconds >= 2 and prints_here():
            # os.write: a print here could land inside another print to the same stream
            os.write(2, f"{signal.Signals(signum).name}: stopping after this step (about "
                        f"{_STOP.step_seconds:.0f} s); Ctrl-C again aborts at once\n".encode())
        return
    raise Interrupted(signum, second=_STOP.deferring)


def install_stop_signals():
    """SIGINT and SIGTERM handlers of a command (run_cli); returns the previous ones. A signal the
    parent ignores (SIG_IGN, e.g. SIGINT of a background job) stays ignored."""
    _STOP.deferring, _STOP.requested, _STOP.exiting, _STOP.note = False, 0, False, ""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _on_stop_signal)
    return previous


def restore_signals(previous):
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def agree_stop(rt):
    """Collective: the stop signal any rank received (0: none; SIGTERM outranks SIGINT), so that
    every rank stops after the same step. One int on a gloo group: no GPU sync."""
    if not rt.distributed:
        return _STOP.requested
    if rt.stop_group is None:
        # NCCL cannot reduce a CPU tensor; a gloo group beside it costs one small TCP message.
        rt.stop_group = (torch.distributed.group.WORLD if torch.distributed.get_backend() == "gloo"
                         else torch.distributed.new_group(backend="gloo"))
    flag = torch.tensor([_STOP.requested], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=rt.stop_group)
    return int(flag.item())


# ==================================================================================================
# 2. Checkpoints
# ==================================================================================================

def save_checkpoint(path, state):
    """Write `state` to `path` atomically: a crash mid-write never leaves a broken ckpt.pt.

    torch.save goes to `path.tmp` first; os.replace is atomic on POSIX and Windows, so a
    reader sees either the previous checkpoint or the new one, never half of one. A save cut off
    (a second Ctrl-C, a full disk) removes its temp file and leaves the previous checkpoint.
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _STOP.note = f"{path} holds step {state['step']}" if "step" in state else f"{path} is saved"


def load_checkpoint(path, method=None):
    """Load a checkpoint with `weights_only=True` (tensors and plain Python values only).

    `method` (e.g. "invert_gan") is compared with the checkpoint's "method" entry so that a
    checkpoint of another script is refused with one clear line instead of a key error.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-torch files
        raise UsageError(f"cannot read checkpoint {path} ({type(err).__name__}): the file is truncated "
                         f"or corrupt (or not a checkpoint). Put back an older copy if you have one; a "
                         f"run's own file can be deleted to start the run again without --resume") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} is not a checkpoint of this project")
    if method is not None and ckpt.get("method") != method:
        raise UsageError(f"{path} is a checkpoint of {ckpt.get('method', 'something else')!r}, "
                         f"not of {method!r}")
    return ckpt


def resume_checkpoint(path, args, method):
    """With --resume, the checkpoint at `path` if there is one, to continue from; else None."""
    return load_checkpoint(path, method=method) if args.resume and os.path.isfile(path) else None


def load_state(module, state_dict, what, path=""):
    """`module.load_state_dict(state_dict)`, with a shape/key mismatch reported as one line."""
    try:
        unwrap(module).load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UsageError(f"checkpoint {path} does not fit this {what} (other architecture or "
                         f"flags?): {first}") from None


def load_generator(G, ckpt, path, device):
    """G with a checkpoint's sampling weights, on `device`, in eval mode: the EMA generator when the
    run kept one (the one its metrics.json measured), else G. For the scripts' load_sampler."""
    load_state(G, ckpt["G_ema"] if ckpt.get("G_ema") is not None else ckpt["G"], "generator", path)
    return G.to(device).eval()


def rng_state():
    """Every RNG this process draws from, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only refuses: store its keys as a tensor.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Inverse of `rng_state`."""
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value):
    # random.setstate wants tuples all the way down; a checkpoint may give lists back.
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def training_state(method, args, step, nets, opts, rt, stream, rng_states, **extra):
    """The checkpoint of a training run: everything needed to continue it bit for bit.

    nets/opts: {name: network or EMA or optimiser (or None)}; networks are saved unwrapped (no
    DDP / compile prefixes). `extra` holds the method's own state (replay buffers, priors, ...).
    """
    for name, obj in nets.items():
        for key, value in (unwrap(obj).state_dict().items() if obj is not None else ()):
            if value.is_floating_point() and not torch.isfinite(value).all():
                ckpt = os.path.join(args.out, "ckpt.pt")
                raise UsageError(f"non-finite weights in {name} ({key}) at step {step}; stopped "
                                 f"without saving, {_last_good(ckpt)}")
    state = {"method": method, "args": vars(args), "step": step,
             "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
             "stream": stream.state_dict(), "rng": rng_states}
    for name, obj in {**nets, **opts}.items():
        state[name] = unwrap(obj).state_dict() if obj is not None else None
    state.update(extra)
    return state


def restore_training_state(ckpt, nets, opts, rt, stream, seed, path):
    """Inverse of `training_state` for one rank; returns the step to continue from."""
    for name, net in nets.items():
        if net is not None:
            load_state(net, ckpt[name], name, path)
    for name, opt in opts.items():
        if opt is not None:
            opt.load_state_dict(ckpt[name])
    if rt.scaler is not None and ckpt.get("scaler"):
        rt.scaler.load_state_dict(ckpt["scaler"])
    stream.load_state_dict(ckpt["stream"])
    restore_rng_states(rt, ckpt["rng"], seed)
    return ckpt["step"]


def gather_per_rank(rt, obj):
    """`obj` of every rank, as a list on every rank (rank 0 saves it). A collective: every rank
    must call it. For per-rank state a checkpoint needs (RNG streams, replay buffers)."""
    if not rt.distributed:
        return [obj]
    everyone = [None] * rt.world_size
    torch.distributed.all_gather_object(everyone, obj)
    return everyone


def save_training_state(path, method, args, step, nets, opts, rt, stream, **extra):
    """training_state with every rank's RNG states, written to `path` by the main process.
    Collective: every rank calls it."""
    rng_states = gather_rng_states(rt)
    if rt.is_main:
        save_checkpoint(path, training_state(method, args, step, nets, opts, rt, stream, rng_states, **extra))


def gather_rng_states(rt):
    """RNG states of all ranks, gathered on every rank (rank 0 saves them in the checkpoint).

    With torchrun each rank draws its own noise, so a bit-for-bit resume needs all of them.
    """
    return gather_per_rank(rt, rng_state())


def restore_rng_states(rt, states, seed):
    """Give this rank its saved RNG state; a run resumed on another world size is reseeded."""
    if len(states) == rt.world_size:
        set_rng_state(states[rt.rank])
    else:
        if rt.is_main:
            print(f"note: checkpoint was written by {len(states)} process(es), this run has "
                  f"{rt.world_size}: RNG streams are reseeded, the run will not be bit-identical")
        seed_rank(rt, seed + 7919)


# ==================================================================================================
# 3. Logging
# ==================================================================================================

def prepare_out_dir(out, args, resume, is_main):
    """Create the output folder and write args.json (main process only).

    A folder that already holds a run is never overwritten: without --resume that is an error,
    so that re-running a command cannot silently destroy a finished run's checkpoint.
    """
    ckpt = os.path.join(out, "ckpt.pt")
    if resume and not os.path.isfile(ckpt):
        raise UsageError(f"--resume: no checkpoint at {ckpt}")
    if not resume and os.path.isfile(ckpt):
        raise UsageError(f"{out} already holds a run (ckpt.pt): pass --resume to continue it "
                         f"or choose another --out")
    write_run_args(out, args, is_main)
    return ckpt


def write_run_args(out, args, is_main):
    """out/samples/ and out/args.json (main process only)."""
    if is_main:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        write_json(os.path.join(out, "args.json"), vars(args) if not isinstance(args, dict) else args)


def write_json(path, obj):
    """JSON file written atomically (temp file + os.replace)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def format_duration(seconds):
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class LossMeter:
    """Running sums of the losses, kept on the device: no `.item()` (GPU sync) per step.

    `add(d_loss=..., g_loss=...)` every step (tensors stay on the device, Python numbers on the
    host: no sync, no copy); `flush()` at a log step returns the means since the last flush as
    Python floats (one sync), averaged over ranks under torchrun.
    `flush()` also reports whether any value was NaN/inf since the last flush, which the scripts
    turn into an error *before* writing a checkpoint, so the last checkpoint is a good one.
    """

    def __init__(self, rt):
        self.rt = rt
        self.sums, self.counts = {}, {}

    def add(self, **values):
        for name, value in values.items():
            if torch.is_tensor(value):
                value = value.detach().float().to(self.rt.device)
            else:
                # A Python number (e.g. a loss weight) is summed on the host, in float32 as on the
                # device, and moved at flush: a copy to the GPU per step would be a blocking
                # host-to-device copy (a stream sync) every step. Added to a sum on the device
                # (after a resume), a 0-dim CPU tensor is a kernel argument, not a copy.
                value = torch.tensor(float(value))
            if name in self.sums:
                self.sums[name] += value
                self.counts[name] += 1
            else:
                self.sums[name] = value.clone()
                self.counts[name] = 1

    def flush(self):
        if not self.sums:
            return {}, True
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n].to(self.rt.device) / self.counts[n] for n in names])
        stacked = self.rt.all_mean(stacked)
        values = stacked.tolist()                       # the one sync
        self.sums, self.counts = {}, {}
        means = dict(zip(names, values))
        return means, all(math.isfinite(v) for v in values)

    def state_dict(self):
        """The sums since the last flush (a run stopped between log steps keeps them)."""
        # A copy also of the sums kept on the host: later steps add to them in place.
        return {name: (self.sums[name].detach().to("cpu", copy=True), self.counts[name])
                for name in self.sums}

    def load_state_dict(self, state):
        self.sums = {name: total.to(self.rt.device) for name, (total, _) in state.items()}
        self.counts = {name: int(count) for name, (_, count) in state.items()}


class Logger:
    """out/log.jsonl (out is made; one JSON object per log step) and a console line; main process only.

    Console: `step 1200/24000 | d_loss 1.3412 | g_loss 0.7021 | 85.3 it/s | eta 0:04:27`.
    On --resume, lines of log.jsonl beyond the checkpoint's step (written after the last
    checkpoint by the run that stopped) are dropped, so the log matches the resumed run.
    """

    def __init__(self, out, is_main, total_steps, start_step=0):
        self.is_main = is_main
        self.total = total_steps
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "log.jsonl")
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.start_time, self.start_step = self.last_time, start_step
        if is_main and os.path.isfile(self.path):
            kept = []
            with open(self.path) as f:
                lines = [line for line in f if line.strip()]
            for i, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise UsageError(f"{self.path}: line {i + 1} is not JSON; the log is "
                                         "damaged beyond a torn last line") from None
                    print(f"note: dropped the torn last line of {self.path} (a crash while "
                          "writing it)", flush=True)
                    continue
                if record["step"] <= start_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def log(self, step, values, **extra):
        now = time.perf_counter()
        speed = (step - self.last_step) / max(now - self.last_time, 1e-9)
        avg = (step - self.start_step) / max(now - self.start_time, 1e-9)
        self.last_time, self.last_step = now, step
        if not self.is_main:
            return
        record = {"step": step, **values, **extra, "it_s": round(speed, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {step}/{self.total}"]
        parts += [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()]
        parts += [f"{speed:.1f} it/s", f"eta {format_duration((self.total - step) / max(avg, 1e-9))}"]
        print(" | ".join(parts), flush=True)

    def info(self, message):
        if self.is_main:
            print(message, flush=True)


# --- Small pieces of the CLI contract every method script shares -------------------------------
def add_eval_args(group, eval_help, data_std_help=None, classifier=False):
    """The evaluation flags the method scripts share; --eval-samples' help names the script's source."""
    group.add_argument("--data-std", type=float, default=None, help=data_std_help or
                       "std of each 2-D mode (default 0.01 ring, 0.05 grid: common.SYNTHETIC_STD)")
    group.add_argument("--eval-samples", type=int, default=None, help=eval_help)
    if classifier:
        group.add_argument("--classifier", default=None, help="stacked datasets: mode classifier file from "
                           "`evaluate.py classifier` (modes, reverse KL)")
    group.add_argument("--inception-weights", default=None,
                       help="pt_inception-2015-12-05 file for the Inception metrics (else hub cache / download)")
    group.add_argument("--fid-stats", default=None,
                       help="real-data statistics .npz (mu, sigma) for FID (else computed from the dataset)")


def add_pacgan_args(group):
    """The flags of --arch pacgan (PacGAN's stacked-MNIST protocol) that every script has."""
    group.add_argument("--d-width", type=int, default=None,
                       help="--arch pacgan: D's width (2 = D at 1/4 of G, PacGAN Table 3's; 4 = 1/2)")
    group.add_argument("--redraw", action=argparse.BooleanOptionalAction, default=None,
                       help="stacked data: fresh random triplets every epoch (PacGAN's on-the-fly data; "
                            "common.StackedDataset); on in the pacgan presets")


def apply_presets(args, presets, method):
    """Fill every flag left at None from `presets` (the paper's values for args.dataset), set the
    default --out, and check the shared run-control flags."""
    for key, value in presets.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out = args.out or os.path.join("runs", f"{method}-{args.dataset}-{args.seed}")
    check_flags(args, positive=("steps", "batch_size", "log_every", "sample_every", "ckpt_every"),
                nonnegative=("threads",))
    args.threads = default_threads(args)
    if args.ckpt_every % args.log_every:
        raise UsageError("--ckpt-every must be a multiple of --log-every (losses are checked for "
                         "NaN at log steps, before a checkpoint is written)")
    return args


def check_flags(args, positive=(), nonnegative=()):
    """One-line errors for numeric flags that must be finite and > 0 (or >= 0)."""
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (nonnegative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(args, name)
            if value is None:
                continue
            if not math.isfinite(value) or not ok(value):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number {what}, got {value}")


def check_shared_flags(args):
    """The checks every method script makes after its presets: --lr-decay-from in [0, 1], --ema < 1,
    --d-width and --redraw only with --arch pacgan."""
    check_in(args, "lr_decay_from", "[0, 1]", "a fraction of --steps")
    if not args.ema < 1:
        raise UsageError("--ema must be < 1 (0 turns the EMA off)")
    if (args.d_width is not None or args.redraw) and args.arch != "pacgan":
        raise UsageError("--d-width and --redraw are for --arch pacgan (stacked data)")


def check_in(args, name, interval, why=None):
    """A one-line error unless the flag `name` lies in `interval`, written as in the message:
    "[0, 1]", "(0, 1)", "(0, 1]" (a bracket includes its end, a parenthesis does not)."""
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    value = getattr(args, name)
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    if not (above and below):
        raise UsageError(f"--{name.replace('_', '-')} must be in {interval}" + (f" ({why})" if why else ""))


def restore_saved_args(args, method, run_control):
    """On --resume, every flag except the run-control ones (steps, out, device, logging, ...) is
    taken from the checkpoint, so a resumed run is the same experiment."""
    if not args.resume:
        return args
    saved = load_checkpoint(os.path.join(args.out, "ckpt.pt"), method=method)["args"]
    ignored = []
    for key, value in saved.items():
        if key in run_control:
            continue
        given = getattr(args, key, None)
        if key in vars(args) and json.dumps(given, default=str) != json.dumps(value, default=str):
            ignored.append(f"--{key.replace('_', '-')} {given} (kept {value})")
        setattr(args, key, value)
    if ignored:
        print(f"note: --resume keeps the checkpoint's flags; ignored: {'; '.join(ignored)}",
              flush=True)
    return args


# Flags a --resume may change (common to all scripts; a script may add its own).
RUN_CONTROL = ("steps", "out", "resume", "device", "amp", "compile", "num_workers", "log_every",
               "sample_every", "ckpt_every", "data_root", "download", "inception_weights",
               "fid_stats", "eval_samples", "threads")


def _last_good(ckpt_path):
    if os.path.isfile(ckpt_path):
        return f"the last good checkpoint is {ckpt_path} (step {load_checkpoint(ckpt_path)['step']})"
    return "no checkpoint was written before it"


def log_step(meter, log, step, ckpt_path, **extra):
    """At a log step: average the losses (one sync), stop with a clear error if any was NaN/inf
    since the last log step (the checkpoint on disk is then the last good one), else log them."""
    means, finite = meter.flush()
    if not finite:
        bad = ", ".join(f"{k}={v}" for k, v in means.items() if not math.isfinite(v))
        raise UsageError(f"non-finite loss at step {step} ({bad}); stopped, {_last_good(ckpt_path)}")
    log.log(step, means, **extra)
    return means


def finish_run(rt, args, metrics, start_time):
    """Write OUT/metrics.json (main process), print it on one line and say where the results are.
    train_seconds: the training time over every process of the run (RunControl), else the time
    since `start_time`."""
    if rt.is_main:
        seconds = rt.train_seconds if rt.train_seconds is not None else time.perf_counter() - start_time
        metrics = dict(metrics, train_seconds=round(seconds, 1))
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        print("metrics: " + format_metrics(metrics), flush=True)
        print(results_line(args.out), flush=True)


def format_metrics(metrics):
    """`name value, ...` on one line, floats to 4 significant digits."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def saved_seconds(ckpt):
    """train_seconds stored in a checkpoint or stage file (0 for files written before they were)."""
    return float(((ckpt or {}).get("run") or {}).get("train_seconds", 0.0))


def results_line(out):
    """`results in OUT: metrics.json, ckpt.pt, ..., samples/ (N pictures)`: what a run left."""
    names = ["metrics.json", "ckpt.pt", "log.jsonl"] + sorted(
        name for name in os.listdir(out) if name.endswith((".png", ".pt")) and name != "ckpt.pt")
    parts = [name for name in names if os.path.isfile(os.path.join(out, name))]
    samples = os.path.join(out, "samples")
    if os.path.isdir(samples):
        count = len(os.listdir(samples))
        parts.append(f"samples/ ({count} picture{'' if count == 1 else 's'})")
    return f"results in {out}: " + ", ".join(parts)


# --- The life of a training loop: stop on a signal, checkpoints, time, first progress line ------
class RunControl:
    """What every training loop does besides training, in one place:

        run = common.RunControl(rt, args, step, meter, resumed_ckpt_or_None)
        while run.going(step):
            ...one step; step += 1; log steps...
            if run.checkpoint_due(step):              # every rank, every step (a collective)
                rng_states = common.gather_rng_states(rt)
                if rt.is_main:
                    common.save_checkpoint(path, common.training_state(..., **run.state()))
        run.end(step)                                 # after a stop: one line, exit 130 / 143

    - SIGINT / SIGTERM (run_cli's handlers): the step in progress finishes, the ranks agree on
      the step to stop after (agree_stop), its checkpoint is written, and `end` prints
      "interrupted at step N of M; saved OUT/ckpt.pt; continue with --resume" and exits 128 +
      the signal. A second signal stops at once; save_checkpoint keeps the file on disk whole.
    - A checkpoint every `every` steps and at the last step, however short the run.
    - train_seconds: this loop's time plus the resumed checkpoint's (or `seconds`, a PGMGAN
      stage's predecessors); into the checkpoint and rt.train_seconds (metrics.json).
    - The loss sums since the last log step go into the checkpoint, so a run stopped between log
      steps logs the same means as one that never stopped.
    - The console: "resuming at step N of M"; a speed / ETA line after ~10 s when the first log
      line is further off (console only: log.jsonl is the same as without it); once, a note when
      an image preset would take hours on the CPU.
    `path` None: the stage is only saved whole (PGMGAN's partition); a stop just exits, and its
    line ends with `again` (how to run the stage again).
    """

    FIRST_LINE_SECONDS = 10.0      # the speed line comes after this long, if no log line came yet
    GPU_NOTE_SECONDS = 3 * 3600    # an ETA above this on the CPU gets the "sized for a GPU" note

    def __init__(self, rt, args, step, meter, resumed=None, *, total=None, every=None, path="ckpt.pt",
                 stage="", shorten="--steps", early=True, seconds=0.0, again="--resume runs it again"):
        self.rt, self.meter, self.stage, self.shorten, self.early = rt, meter, stage, shorten, early
        self.again = again
        self.total = args.steps if total is None else total
        self.every = args.ckpt_every if every is None else every
        self.path = os.path.join(args.out, path) if path else None
        self.dataset = args.dataset
        self.kind = DATASETS.get(getattr(args, "data_name", None) or args.dataset, {}).get("kind")
        self.start = step
        log_every = max(1, getattr(args, "log_every", None) or 1)
        self.first_log = min(self.total, (step // log_every + 1) * log_every)
        saved = (resumed or {}).get("run") or {}
        self.before = saved_seconds(resumed) if resumed is not None else seconds
        partial = saved.get("meter")
        if partial is not None and len(partial) == rt.world_size:
            meter.load_state_dict(partial[rt.rank])
        self.captured, self.captured_step, self.stop, self.told = None, None, 0, False
        self.t0 = time.perf_counter()
        _STOP.deferring, _STOP.requested, _STOP.step_seconds = True, 0, 0.0
        if self.path:
            _STOP.note = (f"{self.path} holds step {step}" if resumed is not None
                          else "no checkpoint was written yet")
        if resumed is not None and rt.is_main:
            print(f"resuming at {self._where(step)} of {self.total}"
                  + ("" if step < self.total else ": training is done, evaluating again"), flush=True)

    def _where(self, step):
        return f"{self.stage} step {step}" if self.stage else f"step {step}"

    def going(self, step):
        """The loop condition: steps left and no stop agreed."""
        if self.stop or step >= self.total:
            return False
        if step > self.start:
            self._progress(step)
        return True

    def _progress(self, step):
        elapsed = time.perf_counter() - self.t0
        _STOP.step_seconds = elapsed / (step - self.start)
        if self.told or elapsed < self.FIRST_LINE_SECONDS:
            return
        self.told = True
        rate = (step - self.start) / elapsed
        eta = (self.total - step) / rate
        if not self.rt.is_main:
            return
        if self.early and step < self.first_log:
            print(f"{self._where(step)}/{self.total} | {rate:.3g} it/s | eta {format_duration(eta)} "
                  f"(losses from step {self.first_log} on, every --log-every)", flush=True)
        if self.kind == "image" and self.rt.device.type == "cpu" and eta > self.GPU_NOTE_SECONDS:
            print(f"note: the {self.dataset} preset is sized for a GPU: its {self.total} "
                  f"{self.stage + ' ' if self.stage else ''}steps take about {format_duration(eta)} "
                  f"more on this CPU; a smaller {self.shorten} gives a shorter run", flush=True)

    def checkpoint_due(self, step):
        """After each step, on every rank (a collective): agree whether to stop; True when a
        checkpoint is due (every `every` steps, the last step, a stop)."""
        self.stop = agree_stop(self.rt)
        due = bool(self.stop) or step >= self.total or bool(self.every and step % self.every == 0)
        if due:
            partial = gather_per_rank(self.rt, self.meter.state_dict())
            if self.stop and not all(torch.isfinite(total).all() for rank in partial
                                     for total, _ in rank.values()):
                where = self.path or "the stage"
                raise UsageError(f"non-finite loss before {self._where(step)}; stopped without saving "
                                 f"{where}" + (f", {_last_good(self.path)}" if self.path else ""))
            self.captured = {"train_seconds": self.before + time.perf_counter() - self.t0,
                             "meter": partial}
            self.captured_step = step
        return due

    def state(self):
        """The checkpoint entries of this loop (captured by the last checkpoint_due)."""
        return {"run": self.captured}

    def end(self, step):
        """After the loop, on every rank: record train_seconds; after an agreed stop print the one
        line, leave the process group and exit 128 + the signal (130 SIGINT, 143 SIGTERM)."""
        self.stop = self.stop or agree_stop(self.rt)    # a signal during the last step's saving
        _STOP.exiting = bool(self.stop)                 # saved: a further signal changes nothing
        _STOP.deferring = False
        self.rt.train_seconds = (self.captured["train_seconds"] if self.captured_step == step
                                 else self.before)
        if not self.stop:
            _STOP.requested = 0
            if self.path:
                _STOP.note = f"{self.path} holds step {step} of {self.total}; --resume continues from it"
            return
        if self.rt.is_main:
            if self.path is None:
                done = f"the {self.stage or 'this'} stage is saved only when it is done: {self.again}"
            elif step >= self.total:
                done = f"saved {self.path}; training is done, --resume evaluates it"
            else:
                done = f"saved {self.path}; continue with --resume"
            print(f"interrupted at {self._where(step)} of {self.total}; {done}", file=sys.stderr,
                  flush=True)
        shutdown(self.rt)
        raise SystemExit(128 + self.stop)


# ==================================================================================================
# 4. Pictures
# ==================================================================================================

# Colours used by every 2-D picture: real data grey, generated points red, mode centres black.
REAL_COLOR, FAKE_COLOR, CENTER_COLOR = (150, 150, 150), (214, 39, 40), (0, 0, 0)
# A qualitative palette for "coloured by mode / partition" pictures (cycled when K > 20).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
           (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
           (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229)]


def fixed_noise(n, dim, device, seed=1234):
    """The same N(0, I) latents at every picture step, from a private generator.

    Pictures drawn from fixed z are comparable across steps, and drawing them never advances the
    training RNG, so a run that saves a picture at step t and one that does not stay identical.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen).to(device)


def save_image_grid(images, path, nrow=None):
    """Save a batch of images in [-1, 1], shape (B, C, H, W), as one PNG grid."""
    from torchvision.utils import save_image

    images = images.detach().float().cpu()
    nrow = nrow or max(1, int(math.sqrt(images.shape[0])))
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)


def plot_points(layers, extent, size=480, title=None, centers=None):
    """Draw 2-D point clouds with PIL and return the image (no matplotlib dependency).

    layers:  list of (points (N, 2) array-like, colour) where colour is one RGB tuple or an
             (N,) integer array of palette indices (points coloured by mode/partition).
    extent:  (xmin, xmax, ymin, ymax) in data units, mapped to the square canvas.
    centers: optional (K, 2) mode centres, drawn as black crosses on top.
    """
    from PIL import Image, ImageDraw

    margin, top = 24, 22 if title else 4
    img = Image.new("RGB", (size + 2 * margin, size + margin + top), "white")
    draw = ImageDraw.Draw(img)
    x0, x1, y0, y1 = extent

    def to_px(p):
        p = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        u = margin + (p[:, 0] - x0) / (x1 - x0) * size
        v = top + (1.0 - (p[:, 1] - y0) / (y1 - y0)) * size   # y axis points up
        return u, v

    draw.rectangle([margin, top, margin + size, top + size], outline=(0, 0, 0))
    for tick in range(math.ceil(x0), math.floor(x1) + 1):       # integer ticks on both axes
        u, _ = to_px([[tick, y0]])
        draw.line([u[0], top + size, u[0], top + size + 4], fill=(0, 0, 0))
        draw.text((u[0] - 3, top + size + 5), str(tick), fill=(0, 0, 0))
    for tick in range(math.ceil(y0), math.floor(y1) + 1):
        _, v = to_px([[x0, tick]])
        draw.line([margin - 4, v[0], margin, v[0]], fill=(0, 0, 0))
        draw.text((2, v[0] - 5), str(tick), fill=(0, 0, 0))
    for points, colour in layers:
        u, v = to_px(points)
        inside = (u >= margin) & (u <= margin + size) & (v >= top) & (v <= top + size)
        if isinstance(colour, tuple):
            cols = [colour] * len(u)
        else:
            cols = [PALETTE[int(c) % len(PALETTE)] for c in np.asarray(colour).reshape(-1)]
        for a, b, c, ok in zip(u, v, cols, inside):
            if ok:
                draw.rectangle([a - 1, b - 1, a + 1, b + 1], fill=c)
    if centers is not None:
        u, v = to_px(centers)
        for a, b in zip(u, v):
            draw.line([a - 5, b, a + 5, b], fill=CENTER_COLOR, width=2)
            draw.line([a, b - 5, a, b + 5], fill=CENTER_COLOR, width=2)
    if title:
        draw.text((margin, 4), title, fill=(0, 0, 0))
    return img


def plot_bars(values, size=(480, 240), title=None, reference=None):
    """Bar chart (PIL) of `values` (e.g. the share of samples per mode); a dashed line at
    `reference` (e.g. 1/K, the share every mode has in the data)."""
    from PIL import Image, ImageDraw

    values = np.asarray(values, dtype=np.float64)
    w, h = size
    margin, top = 24, 22 if title else 6
    img = Image.new("RGB", (w + 2 * margin, h + top + 18), "white")
    draw = ImageDraw.Draw(img)
    vmax = max(float(values.max()) if values.size else 1.0, reference or 0.0, 1e-12) * 1.1
    bar = w / max(len(values), 1)
    for i, val in enumerate(values):
        x = margin + i * bar
        draw.rectangle([x + 1, top + h * (1 - val / vmax), x + bar - 1, top + h],
                       fill=PALETTE[i % len(PALETTE)])
    if reference is not None:
        y = top + h * (1 - reference / vmax)
        for x in range(margin, margin + w, 8):
            draw.line([x, y, x + 4, y], fill=(0, 0, 0))
    draw.line([margin, top + h, margin + w, top + h], fill=(0, 0, 0))
    draw.text((margin, top + h + 3), f"max {values.max() if values.size else 0:.3f}", fill=(0, 0, 0))
    if title:
        draw.text((margin, 4), title, fill=(0, 0, 0))
    return img


def plot_heatmap(values, extent, size=480, title=None):
    """A (H, W) array of values over the plane `extent` as a blue(low)->yellow(high) map."""
    from PIL import Image, ImageDraw

    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    t = (v - lo) / max(hi - lo, 1e-12)
    rgb = np.stack([t * 253 + (1 - t) * 68, t * 231 + (1 - t) * 1, t * 37 + (1 - t) * 84], -1)
    heat = Image.fromarray(rgb[::-1].astype(np.uint8)).resize((size, size), Image.NEAREST)
    top = 22 if title else 4
    img = Image.new("RGB", (size + 8, size + top + 18), "white")
    img.paste(heat, (4, top))
    draw = ImageDraw.Draw(img)
    draw.text((4, top + size + 3), f"x, y in [{extent[0]}, {extent[1]}] x [{extent[2]}, {extent[3]}]; "
              f"min {lo:.3g} (dark) max {hi:.3g} (yellow)", fill=(0, 0, 0))
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0))
    return img



@contextlib.contextmanager
def drawing(net, device, seed):
    """For a picture during training: `net` in eval mode and the RNG forked and seeded with `seed`,
    so the picture never shifts the training noise; net's mode is restored after."""
    was_training = net.training
    net.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield net
    net.train(was_training)


def plane_grid(extent, res):
    """(res * res, 2) points of a res x res grid over the plane `extent`, row by row from the bottom
    (row = y): the layout plot_heatmap draws after a reshape(res, res)."""
    xs = torch.linspace(extent[0], extent[1], res)
    ys = torch.linspace(extent[2], extent[3], res)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")                      # row = y (bottom first)
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)


@torch.no_grad()
def class_rows(G, classes, z_dim, device, path, per_row=8):
    """One row of per_row samples G(z, y) of a class-conditional G for each class y of `classes`."""
    y = classes.repeat_interleave(per_row).to(device)
    z = torch.randn(len(y), z_dim, device=device)
    save_image_grid(G(z, y), path, nrow=per_row)

def hconcat(images, path=None):
    """Paste PIL images side by side (top-aligned); save to `path` if given."""
    from PIL import Image

    width = sum(im.width for im in images)
    height = max(im.height for im in images)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    if path is not None:
        canvas.save(path)
    return canvas


def extent_for(dataset, margin=1.0):
    """Plot window of the synthetic datasets: all modes plus a margin, square."""
    centers, _ = synthetic_modes(dataset)
    lim = float(centers.abs().max()) + margin
    return (-lim, lim, -lim, lim)


# ==================================================================================================
# 5. Datasets
# ==================================================================================================

# --- The table of datasets -------------------------------------------------------------------
# kind "points": 2-D synthetic mixtures (x is a (2,) vector); kind "image": (C, H, W) in [-1, 1].
# img_size is the default resolution (METHODS.md); n_classes is the number of labels/modes
# (None for folder: it is the number of sub-folders; 0 when the data has no labels).
DATASETS = {
    "ring": dict(kind="points", channels=2, img_size=1, n_classes=8),
    "grid": dict(kind="points", channels=2, img_size=1, n_classes=25),
    "mnist": dict(kind="image", channels=1, img_size=28, n_classes=10),
    "fashion-mnist": dict(kind="image", channels=1, img_size=28, n_classes=10),
    "stacked-mnist": dict(kind="image", channels=3, img_size=32, n_classes=1000),
    "stacked-fashion-mnist": dict(kind="image", channels=3, img_size=32, n_classes=1000),
    "cifar10": dict(kind="image", channels=3, img_size=32, n_classes=10),
    "cifar100": dict(kind="image", channels=3, img_size=32, n_classes=100),
    "stl10": dict(kind="image", channels=3, img_size=48, n_classes=10),
    "celeba": dict(kind="image", channels=3, img_size=256, n_classes=0),
    "folder": dict(kind="image", channels=3, img_size=64, n_classes=None),
}
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"   # Debian dataset-fashion-mnist
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def dataset_info(name):
    """The DATASETS entry of `name`, or a UsageError listing the known names."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return dict(DATASETS[name])


def default_data_root(name):
    """./data/<family>, except Fashion-MNIST, read from the Debian package's folder if present."""
    family = {"stacked-mnist": "mnist", "stacked-fashion-mnist": "fashion-mnist"}.get(name, name)
    if family == "fashion-mnist" and os.path.isdir(FASHION_MNIST_SYSTEM_DIR):
        return FASHION_MNIST_SYSTEM_DIR
    return os.path.join("data", family)


# --- Synthetic 2-D mixtures (ring, grid) ------------------------------------------------------
# Standard deviations: 0.01 (ring) and 0.05 (grid), the values of the mode-collapse literature
# (VEEGAN, PacGAN and the PGMGAN code). InvertGAN's Sec. 5.1 says "standard deviation 0.001 /
# 0.0025": the grid's 0.0025 is the standard 0.05 squared (a variance, as PGMGAN's code names it),
# the ring's 0.001 is neither 0.01 nor 0.01^2; it writes the ring means as (2cos, 2cos), a typo for
# (2cos, 2sin). `--data-std` overrides the default.
SYNTHETIC_STD = {"ring": 0.01, "grid": 0.05}


def synthetic_modes(name, data_std=None):
    """Mode centres (K, 2) and the per-mode std of `ring` (K=8, radius 2) or `grid` (K=25)."""
    if name == "ring":
        angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        centers = torch.stack([2 * torch.cos(angle), 2 * torch.sin(angle)], 1)
    elif name == "grid":
        ij = torch.arange(-2, 3, dtype=torch.float64)
        centers = torch.stack(torch.meshgrid(2 * ij, 2 * ij, indexing="ij"), -1).reshape(-1, 2)
    else:
        raise UsageError(f"{name!r} is not a 2-D dataset (ring, grid)")
    return centers.float(), float(SYNTHETIC_STD[name] if data_std is None else data_std)


class PointDataset(torch.utils.data.Dataset):
    """In-memory (N, 2) points with their mode labels; `get_batch` indexes without a DataLoader."""

    def __init__(self, points, labels):
        self.points, self.labels = points, labels

    def __len__(self):
        return len(self.points)

    def __getitem__(self, i):
        return self.points[i], self.labels[i]

    def get_batch(self, idx):
        return self.points[idx], self.labels[idx]


def make_synthetic(name, n_points=100_000, data_std=None, seed=0):
    """`n_points` samples split equally over the modes (12.5K per ring mode, 4K per grid mode,
    InvertGAN Sec. 5.1), drawn with a fixed seed so every run sees the same training set."""
    centers, std = synthetic_modes(name, data_std)
    k = len(centers)
    per_mode = n_points // k
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(per_mode)
    points = centers[labels] + std * torch.randn(len(labels), 2, generator=gen)
    return PointDataset(points, labels)


# --- In-memory image arrays (MNIST, CIFAR, STL-10, stacked MNIST) --------------------------------
def _resize_uint8(images, size, chunk=2048):
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear with antialias, in chunks."""
    import torch.nn.functional as F

    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i:i + chunk] = x.round().clamp_(0, 255).to(torch.uint8)
    return out


class TensorImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) kept in memory; items are float in [-1, 1] and int labels."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].float() / 127.5 - 1.0, int(self.labels[i])

    def get_uint8(self, idx):
        return self.images[idx]

    def get_batch(self, idx):
        return self.get_uint8(idx).float() / 127.5 - 1.0, self.labels[idx]


class StackedDataset(torch.utils.data.Dataset):
    """Stacked (Fashion-)MNIST: three grey images in the R, G, B channels, 1000 modes.

    Item i stacks base images (i, p[i], q[i]) for two fixed random permutations p, q (seeded),
    so the training set is a fixed set of len(base) triplets. Label = 100*a + 10*b + c, where
    a, b, c are the labels of the R, G and B channels.

    redraw=True (PacGAN's data, model.py: three training images drawn at random for every sample):
    set_epoch(e), which BatchStream calls at each epoch's start, replaces the triplets with
    len(base) fresh ones, each channel an independent uniform draw with replacement, from a
    generator seeded by (seed, e) alone: deterministic, and a resumed run redraws the same ones.
    What remains different from PacGAN (ours): the draws come in epochs of len(base) that the
    sampler shuffles, and the epoch's last len(base) % batch triplets go unused (drop_last).
    """

    def __init__(self, base_images, base_labels, seed=0, redraw=False):
        self.base_images, self.base_labels, self.seed, self.redraw = base_images, base_labels, seed, redraw
        self.epoch = None
        if redraw:
            self.set_epoch(0)
            return
        gen = torch.Generator().manual_seed(seed)
        n = len(base_images)
        self._set_triplets(torch.stack([torch.arange(n), torch.randperm(n, generator=gen),
                                        torch.randperm(n, generator=gen)], 1))   # (N, 3)

    def _set_triplets(self, triplets):
        self.triplets = triplets
        digits = self.base_labels[triplets]                                  # (N, 3)
        self.labels = digits[:, 0] * 100 + digits[:, 1] * 10 + digits[:, 2]

    def set_epoch(self, epoch):
        """redraw: the triplets of epoch `epoch` (a function of (seed, epoch) only); else nothing."""
        if not self.redraw or epoch == self.epoch:
            return
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * epoch + 1)
        n = len(self.base_images)
        self._set_triplets(torch.randint(0, n, (n, 3), generator=gen))
        self.epoch = epoch

    def __len__(self):
        return len(self.triplets)

    def __getitem__(self, i):
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], int(y[0])

    def get_uint8(self, idx):
        trip = self.triplets[idx]                                            # (B, 3)
        x = self.base_images[trip.reshape(-1)]                               # (3B, 1, H, W)
        return x.reshape(len(trip), 3, *x.shape[-2:])                        # (B, 3, H, W)

    def get_batch(self, idx):
        return self.get_uint8(idx).float() / 127.5 - 1.0, self.labels[idx]


def read_idx(path):
    """Read an IDX file (the MNIST format), gzipped or not, into a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
            raise ValueError("bad magic number")
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return torch.from_numpy(body.reshape(dims).copy())
    except (OSError, EOFError, ValueError) as err:
        raise UsageError(f"cannot read IDX file {path}: {err}") from None


# How to place each dataset by hand when --download cannot (no network, a dead mirror).
_BY_HAND = {
    "mnist": "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
             "and t10k-labels-idx1-ubyte.gz (from any MNIST mirror) in {root}",
    "fashion-mnist": "put the four Fashion-MNIST files (train-images-idx3-ubyte.gz, "
                     "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) "
                     "in {root}, or `apt-get install dataset-fashion-mnist` and drop --data-root",
    "cifar10": "unpack cifar-10-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) in {root}, which "
               "gives {root}/cifar-10-batches-py/",
    "cifar100": "unpack cifar-100-python.tar.gz (www.cs.toronto.edu/~kriz/cifar.html) in {root}, which "
                "gives {root}/cifar-100-python/",
    "stl10": "unpack stl10_binary.tar.gz (cs.stanford.edu/~acoates/stl10) in {root}, which gives "
             "{root}/stl10_binary/*.bin",
    "celeba": "put img_align_celeba/*.jpg and list_eval_partition.txt (the CelebA site's Google "
              "Drive) in {root}/celeba/",
}


def _download(name, root, fetch):
    """Run `fetch()` (a torchvision download into `root`). If it fails, remove every file and
    folder the attempt created and raise one line: the dataset, the cause, how to place the files
    by hand."""
    import shutil

    root = os.path.abspath(root)
    new_top = None                              # the highest folder the attempt will create
    if not os.path.exists(root):
        new_top = root
        while not os.path.exists(os.path.dirname(new_top)):
            new_top = os.path.dirname(new_top)
    before = set() if new_top else {os.path.join(d, n) for d, dirs, files in os.walk(root)
                                    for n in dirs + files}
    try:
        fetch()
    except BaseException as err:
        if new_top:
            shutil.rmtree(new_top, ignore_errors=True)
        else:
            made = {os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files}
            for path in sorted(made - before, key=len, reverse=True):   # files before their folders
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                elif os.path.lexists(path):
                    os.remove(path)
        if not isinstance(err, Exception):
            raise
        cause = str(err).strip().splitlines()
        cause = next((line for line in reversed(cause) if line.strip()), type(err).__name__)
        raise UsageError(f"--download of {name} failed ({cause.strip()}); without a network, "
                         f"{_BY_HAND[name].format(root=root)} and run again without --download") from None


def _find_file(root, names, subdirs):
    for sub in subdirs:
        for name in names:
            path = os.path.join(root, sub, name)
            if os.path.isfile(path):
                return path
    return None


def load_mnist_like(name, root, split="train", download=False):
    """MNIST / Fashion-MNIST as (uint8 (N, 1, 28, 28), labels).

    Looks for the four IDX files (gzipped or not) directly in `root` (the layout of Debian's
    dataset-fashion-mnist package) and in torchvision's `root/<Class>/raw` layout.
    """
    tv_class = "MNIST" if name == "mnist" else "FashionMNIST"
    subdirs = ["", "raw", os.path.join(tv_class, "raw")]
    if download:
        import torchvision

        cls = getattr(torchvision.datasets, tv_class)
        _download(name, root, lambda: (cls(root, train=True, download=True),
                                       cls(root, train=False, download=True)))
    parts = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}
    if split not in parts:
        raise UsageError(f"unknown split {split!r} for {name}: choose train, test or all")
    images, labels = [], []
    for prefix in parts[split]:
        found = []
        for kind, magic in (("images", "idx3"), ("labels", "idx1")):
            base = f"{prefix}-{kind}-{magic}-ubyte"
            path = _find_file(root, [base + ".gz", base], subdirs)
            if path is None:
                raise UsageError(f"no {name} files in {root} (looked for {base}[.gz] in "
                                 f"{root} and {os.path.join(root, tv_class, 'raw')}); "
                                 f"pass --data-root or --download")
            found.append(read_idx(path))
        if found[0].shape[0] != found[1].shape[0]:
            raise UsageError(f"{name} in {root}: {found[0].shape[0]} images but "
                             f"{found[1].shape[0]} labels")
        images.append(found[0].unsqueeze(1))
        labels.append(found[1].long())
    return torch.cat(images), torch.cat(labels)


def load_cifar(name, root, split="train", download=False):
    """CIFAR-10/100 from the python pickle batches (torchvision's layout), uint8 (N, 3, 32, 32).

    Read directly (not through torchvision's class, which insists on the official MD5 sums,
    so that the tests can feed it small files written in the same format).
    """
    import pickle

    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        _download(name, root, lambda: cls(root, train=True, download=True))
    if name == "cifar10":
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    else:
        files = {"train": ["train"], "test": ["test"]}
    files["all"] = files["train"] + files["test"]
    if split not in files:
        raise UsageError(f"unknown split {split!r} for {name}: choose train, test or all")
    images, labels = [], []
    for fname in files[split]:
        path = os.path.join(root, folder, fname)
        if not os.path.isfile(path):
            raise UsageError(f"missing {name} file {path}; pass --data-root or --download")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = batch["labels"] if "labels" in batch else batch["fine_labels"]
        except Exception as err:
            raise UsageError(f"cannot read {name} batch {path}: {type(err).__name__}") from None
        images.append(torch.from_numpy(data.copy()))
        labels.append(torch.as_tensor(lab, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def load_stl10(root, split="train+unlabeled", download=False):
    """STL-10 binary files (torchvision's `stl10_binary` layout) as uint8 (N, 3, 96, 96).

    Unlabeled images get label -1. The files store each image column-major: transpose H and W.
    """
    if download:
        import torchvision

        _download("stl10", root, lambda: torchvision.datasets.STL10(root, split="train", download=True))
    parts = {"train": ["train"], "test": ["test"], "unlabeled": ["unlabeled"],
             "train+unlabeled": ["train", "unlabeled"], "all": ["train", "test", "unlabeled"]}
    if split not in parts:
        raise UsageError(f"unknown split {split!r} for stl10: choose {', '.join(parts)}")
    images, labels = [], []
    for part in parts[split]:
        xpath = os.path.join(root, "stl10_binary", f"{part}_X.bin")
        if not os.path.isfile(xpath):
            raise UsageError(f"missing STL-10 file {xpath}; pass --data-root or --download")
        raw = np.fromfile(xpath, dtype=np.uint8)
        if raw.size % (3 * 96 * 96):
            raise UsageError(f"cannot read STL-10 file {xpath}: size is not a whole number of images")
        x = torch.from_numpy(raw.reshape(-1, 3, 96, 96)).transpose(2, 3).contiguous()
        ypath = os.path.join(root, "stl10_binary", f"{part}_y.bin")
        if os.path.isfile(ypath):
            y = torch.from_numpy(np.fromfile(ypath, dtype=np.uint8).astype(np.int64) - 1)
        else:
            y = torch.full((len(x),), -1, dtype=torch.long)
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


# --- Image files (CelebA, folders: AnimeFace, FFHQ, ImageNet) ----------------------------------
class ImageFileDataset(torch.utils.data.Dataset):
    """Images read from files on the fly: centre crop (square, or `crop` pixels), resize, [-1, 1].

    An unreadable file stops the run with a UsageError that names it.
    """

    def __init__(self, files, labels, img_size, crop=None):
        self.files, self.labels, self.img_size, self.crop = files, labels, img_size, crop
        # What real-image statistics are keyed by (common.real_stats).
        self.crop_rule = "centre square" if crop is None else f"centre {crop}x{crop}"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.load_uint8(i).float() / 127.5 - 1.0, self.labels[i]

    def load_uint8(self, i):
        """Image i as uint8 (3, img_size, img_size), cropped and resized."""
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except Exception as err:
            raise UsageError(f"cannot read image {path}: {type(err).__name__}") from None
        w, h = im.size
        side = min(w, h) if self.crop is None else min(self.crop, w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != self.img_size:
            im = im.resize((self.img_size, self.img_size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def list_images(root):
    """Every image file under `root` (recursive, sorted) and ImageFolder-style labels: the index
    of its first-level sub-folder (0 for files directly in `root`)."""
    if not os.path.isdir(root):
        raise UsageError(f"data folder {root} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise UsageError(f"data folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    classes = sorted({os.path.relpath(f, root).split(os.sep)[0] for f in files
                      if os.sep in os.path.relpath(f, root)})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(os.path.relpath(f, root).split(os.sep)[0], 0) for f in files]
    return files, labels


def load_celeba_files(root, split="train", download=False):
    """CelebA's aligned images (torchvision layout: root/celeba/img_align_celeba/*.jpg) and
    the official partition file list_eval_partition.txt (0 train, 1 valid, 2 test)."""
    if download:
        import torchvision

        _download("celeba", root, lambda: torchvision.datasets.CelebA(root, split="all", download=True))
    base = os.path.join(root, "celeba") if os.path.isdir(os.path.join(root, "celeba")) else root
    img_dir = os.path.join(base, "img_align_celeba")
    files, _ = list_images(img_dir)
    parts = {"train": {0}, "valid": {1}, "test": {2}, "all": {0, 1, 2}}
    if split not in parts:
        raise UsageError(f"unknown split {split!r} for celeba: choose {', '.join(parts)}")
    part_file = os.path.join(base, "list_eval_partition.txt")
    if split != "all":
        if not os.path.isfile(part_file):
            raise UsageError(f"missing {part_file} (needed for split {split!r}; or use split all)")
        with open(part_file) as f:
            keep = {line.split()[0] for line in f if line.strip() and int(line.split()[1]) in parts[split]}
        files = [p for p in files if os.path.basename(p) in keep]
        if not files:
            raise UsageError(f"no CelebA images of split {split!r} in {img_dir}")
    return files


# --- One entry point ----------------------------------------------------------------------------
def build_dataset(name, root=None, split="train", img_size=None, download=False, data_std=None,
                  n_points=100_000, seed=0, redraw=False):
    """Any dataset of DATASETS as a torch Dataset of (x, y); x in [-1, 1].

    split: "train" (default), "test", "all" (train+test; MaEM's CIFAR-10 runs use it), and for
    STL-10 also "unlabeled" / "train+unlabeled". img_size: None = the dataset's default.
    redraw: stacked datasets only, fresh triplets every epoch (StackedDataset).
    """
    info = dataset_info(name)
    if info["kind"] == "points":
        return make_synthetic(name, n_points, data_std, seed)
    root = root or default_data_root(name)
    size = img_size or info["img_size"]
    if name in ("mnist", "fashion-mnist", "stacked-mnist", "stacked-fashion-mnist"):
        base = "mnist" if "fashion" not in name else "fashion-mnist"
        if not download and not os.path.isdir(root):
            raise UsageError(f"data folder {root} does not exist; pass --data-root or --download")
        images, labels = load_mnist_like(base, root, split, download)
        images = _resize_uint8(images, size)
        if name.startswith("stacked"):
            return StackedDataset(images, labels, seed, redraw=redraw)
        return TensorImageDataset(images, labels)
    if name in ("cifar10", "cifar100"):
        images, labels = load_cifar(name, root, split, download)
        return TensorImageDataset(_resize_uint8(images, size), labels)
    if name == "stl10":
        images, labels = load_stl10(root, "train+unlabeled" if split == "train" else split, download)
        return TensorImageDataset(_resize_uint8(images, size), labels)
    if name == "celeba":
        files = load_celeba_files(root, split, download)
        # Crop the central 178x178 face region of the aligned 178x218 images, then resize.
        return ImageFileDataset(files, [0] * len(files), size, crop=178)
    files, labels = list_images(root)                   # "folder"
    return ImageFileDataset(files, labels, size)


# --- Batches -----------------------------------------------------------------------------------
def _clean_worker_error(err):
    # A UsageError raised in a DataLoader worker comes back with the worker's traceback in its
    # message; keep only the original one-line message.
    lines = [line for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else str(err)
    return last.split("UsageError: ", 1)[-1]


def _worker_in_own_process_group(_):
    # Ctrl-C and torchrun's SIGTERM go to a whole process group: the loader's workers leave it, so
    # that they keep feeding the step that finishes before a stop (the loader still ends them).
    if hasattr(os, "setpgrp"):
        os.setpgrp()


class BatchStream:
    """An endless stream of batches for training: DistributedSampler + set_epoch, resumable.

    `batch_size` is the *global* batch; each of the `world_size` ranks gets batch_size/world_size
    different samples (DistributedSampler splits each epoch's permutation). The stream counts
    epochs and the batches used in the current one; `state_dict()` saves them, so a resumed run
    continues with exactly the next batch. In-memory datasets are indexed directly
    (`get_batch`), file-backed ones go through a DataLoader with `num_workers` workers.
    """

    def __init__(self, dataset, batch_size, rt, shuffle=True, seed=0, num_workers=0):
        from torch.utils.data.distributed import DistributedSampler

        if batch_size % rt.world_size:
            raise UsageError(f"--batch-size {batch_size} is not divisible by the world size "
                             f"{rt.world_size}")
        self.dataset, self.rt, self.num_workers, self.seed = dataset, rt, num_workers, seed
        self.per_rank = batch_size // rt.world_size
        self.sampler = DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank,
                                          shuffle=shuffle, seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.per_rank
        if self.steps_per_epoch == 0:
            raise UsageError(f"the dataset has {len(dataset)} samples, fewer than one batch of "
                             f"{batch_size}")
        self.epoch, self.pos, self._it = 0, 0, None

    def _start_epoch(self):
        self.sampler.set_epoch(self.epoch)
        if hasattr(self.dataset, "set_epoch"):       # StackedDataset(redraw=True): this epoch's triplets
            self.dataset.set_epoch(self.epoch)
        idx = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        n = self.steps_per_epoch * self.per_rank
        batches = idx[:n].view(self.steps_per_epoch, self.per_rank)[self.pos:]
        if hasattr(self.dataset, "get_batch"):
            self._it = (self.dataset.get_batch(b) for b in batches)
        else:
            # Its own generator: a DataLoader draws its workers' base seed when an epoch starts, from
            # the global RNG otherwise, and a resumed run starts its epoch at another moment.
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rt.rank)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=batches.tolist(), num_workers=self.num_workers,
                pin_memory=self.rt.device.type == "cuda", worker_init_fn=_worker_in_own_process_group,
                generator=gen)
            self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._start_epoch()
        try:
            x, y = next(self._it)
        except StopIteration:
            self.epoch, self.pos = self.epoch + 1, 0
            self._start_epoch()
            x, y = next(self._it)
        except UsageError as err:
            raise UsageError(_clean_worker_error(err)) from None
        self.pos += 1
        non_blocking = self.rt.device.type == "cuda"
        return x.to(self.rt.device, non_blocking=non_blocking), torch.as_tensor(y).to(self.rt.device, non_blocking=non_blocking)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._it = int(state["epoch"]), int(state["pos"]), None


# ==================================================================================================
# 5b. Representation learning and clustering helpers (SimCLR views, loss and pretext stage, kNN graph,
#     clustering metrics, batched mapping over a dataset, a progress line, presets in --help, --resume
#     of stage files)
# ==================================================================================================

class PresetHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default and the description / presets epilog printed as written."""


def presets_epilog(presets, sources, *tables):
    """--help's epilog: per preset one line of sources and one of values; then each further
    (title, {name: values}) table, a line per name."""
    lines = ["presets (flags left unset take these values; see the comments at PRESETS):"]
    for name, values in presets.items():
        lines.append(f"  {name}: {sources[name]}")
        lines.append("    " + ", ".join(f"{k}={v}" for k, v in values.items()))
    for title, table in tables:
        lines += ["", title] + [f"  {name}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                                for name, values in table.items()]
    return "\n".join(lines)


def add_simclr_args(group):
    """The augmentation flags of simclr_augment (SimCLR / SCAN values as defaults)."""
    group.add_argument("--aug-crop", type=float, default=0.2,
                       help="random resized crop: smallest area fraction (SimCLR/SCAN: 0.2); 1 = off")
    group.add_argument("--aug-flip", type=float, default=0.5, help="probability of a horizontal flip")
    group.add_argument("--aug-color", type=float, default=0.4,
                       help="colour jitter strength: brightness/contrast/saturation factors in "
                            "[1-s, 1+s] (SCAN: 0.4); 0 = off")
    group.add_argument("--aug-color-p", type=float, default=0.8, help="probability of colour jitter (SimCLR: 0.8)")
    group.add_argument("--aug-gray", type=float, default=0.2, help="probability of grayscale (SimCLR: 0.2)")


def check_simclr_args(args):
    check_flags(args, nonnegative=("aug_flip", "aug_color", "aug_color_p", "aug_gray"))
    check_in(args, "aug_crop", "(0, 1]")


def plan_stages(out, resume, wanted, files, needs, resumable=()):
    """Which of the `wanted` stages (in order) this invocation runs. files: stage -> its output
    file in `out`; needs: stage -> the stage whose file it reads (or None). Without --resume a
    stage never overwrites its own output; with it a finished stage is skipped, except the
    `resumable` ones, which continue from their file. A stage whose input is neither planned
    nor on disk is a usage error."""
    todo = []
    for stage in wanted:
        exists = os.path.isfile(os.path.join(out, files[stage]))
        if exists and not resume:
            raise UsageError(f"{out} already holds {files[stage]}: pass --resume to continue the run "
                             f"or choose another --out")
        if not (exists and resume and stage not in resumable):
            todo.append(stage)
    for stage in todo:
        before = needs.get(stage)
        path = os.path.join(out, files[before]) if before else None
        if before and before not in todo and not os.path.isfile(path):
            raise UsageError(f"--stage {stage} needs {path}: run --stage {before} first (same --out)")
    return todo


def restore_args(args, out_files, method, run_control):
    """--resume: every flag but the run-control ones comes from the first of `out_files` (names
    in args.out, newest stage first) that exists."""
    if not args.resume:
        return args
    for name in out_files:
        path = os.path.join(args.out, name)
        if os.path.isfile(path):
            for key, value in load_checkpoint(path, method=method)["args"].items():
                if key not in run_control:
                    setattr(args, key, value)
            return args
    raise UsageError(f"--resume: nothing to resume in {args.out} (no {', '.join(out_files)})")



def check_made_with(path, made, args, names):
    """A usage error if the stage file `path`, made with the flags `made` (its saved args), differs
    from this run in any of the flags `names`."""
    def flags(value):
        return " ".join(f"--{name.replace('_', '-')} {value(name)}" for name in names)
    if any(made[name] != getattr(args, name) for name in names):
        raise UsageError(f"{path} was made with {flags(made.get)}; this run has "
                         f"{flags(lambda name: getattr(args, name))}")

class ProjectionHead(nn.Module):
    """SimCLR's MLP head h = W2 relu(W1 features) on flattened features: (B, ...) -> (B, out_dim)."""

    def __init__(self, in_dim, out_dim, hidden=512):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)

    def forward(self, feats):
        return self.fc2(F.relu(self.fc1(feats.flatten(1))))


class PretextNet(nn.Module):
    """A trunk with a `features(x)` method followed by a projection head: x -> h. One module, so
    that DDP sees a single forward."""

    def __init__(self, phi, head):
        super().__init__()
        self.phi, self.head = phi, head

    def forward(self, x):
        return self.head(self.phi.features(x))


class ReLUClassifier(nn.Module):
    """A plain ReLU MLP with a linear head: `n_layers` hidden layers of `width` units, logits (B, k).
    `features(x)` is the last hidden layer; `converge()` does nothing (the interface of a
    spectrally normalised network whose power iterations must converge before use)."""

    def __init__(self, in_dim, k, n_layers, width):
        super().__init__()
        dims = [in_dim] + [width] * n_layers
        self.body = nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.feat_dim = dims[-1]
        self.head = nn.Linear(self.feat_dim, k)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))

    def converge(self, n=100):
        pass


class ProgressLine:
    """A progress line for a long phase (embedding a dataset, a kNN graph, training steps, samples
    for metrics): `add(n)` after each piece; prints `label: done/total unit (p%), elapsed, eta` on
    stdout. Main process only (`show`)."""

    def __init__(self, label, total, unit="", every=10.0, show=True):
        self.label, self.total, self.every, self.show = label, total, every, show
        self.unit = f" {unit}" if unit else ""
        self.done, self.start, self.last = 0, time.perf_counter(), None

    def add(self, n=1):
        """Count n more. Silent for a phase shorter than 2 s; else the first call after 2 s prints
        (the phase's first eta), then one line every `every` seconds and one at the end."""
        self.done += n
        now = time.perf_counter()
        due = self.last is None or now - self.last >= self.every or self.done >= self.total
        if self.show and due and now - self.start >= 2.0:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"{self.label}: {self.done}/{self.total}{self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{format_duration(now - self.start)} elapsed, eta "
                  f"{format_duration(max(self.total - self.done, 0) / max(rate, 1e-9))}", flush=True)


def fetch_batch(dataset, idx):
    """Data points idx (LongTensor) of a dataset, as one batch (B, ...)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(idx)[0]
    return torch.stack([dataset[int(i)][0] for i in idx])



def seeded_subset(total, n=None, seed=0):
    """torch.arange(total), or (n given) the first n of a random permutation of it drawn with
    `seed`, in that random order."""
    if not n:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]

def dataset_labels(dataset):
    labels = getattr(dataset, "labels", None)
    return None if labels is None else torch.as_tensor(labels).long()


@torch.no_grad()
def map_batches(fn, dataset, device, batch=1000, idx=None, progress=None):
    """fn applied to the whole dataset (or the rows idx) in batches; results concatenated on the
    CPU. progress: a label for a progress line (None: silent)."""
    idx = torch.arange(len(dataset)) if idx is None else idx
    line = ProgressLine(progress, len(idx), "items", show=progress is not None)
    outs = []
    for i in range(0, len(idx), batch):
        outs.append(fn(fetch_batch(dataset, idx[i:i + batch]).to(device)).float().cpu())
        line.add(len(outs[-1]))
    return torch.cat(outs)


class IndexedDataset(torch.utils.data.Dataset):
    """(x, index) instead of (x, label): the random baseline looks its ids up by index."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i][0], i

    def get_batch(self, idx):
        return fetch_batch(self.base, idx), idx

    def set_epoch(self, epoch):                      # the base's redraw (StackedDataset), if any
        getattr(self.base, "set_epoch", lambda e: None)(epoch)


def simclr_augment(x, crop=0.2, flip=0.5, color=0.4, color_p=0.8, gray=0.2):
    """Two SimCLR views are two calls of this on the same batch. x: (B, C, H, W) in [-1, 1].

    Random resized crop (area in [crop, 1], aspect ratio in [3/4, 4/3]) and horizontal flip (with
    probability flip) as one affine resampling per image, then colour jitter (brightness, contrast,
    saturation factors in [1 - color, 1 + color]) with probability color_p and grayscale with
    probability gray. Batched on the device.
    SimCLR applies the jitter components in random order and adds hue; we keep a fixed order.
    """
    b, c = x.shape[0], x.shape[1]
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(crop, 1.0)
    ratio = torch.exp(torch.empty(b, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3)))
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)      # crop size / image size
    # A ratio that makes the crop wider (taller) than the image keeps the area, clipping that side.
    too_wide, too_tall = w > 1, h > 1
    w = torch.where(too_wide, 1.0, torch.where(too_tall, area, w))
    h = torch.where(too_tall, 1.0, torch.where(too_wide, area, h))
    cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)     # crop centre in [-1, 1] coordinates
    cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
    mirror = torch.where(torch.rand(b, device=dev) < flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * mirror, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    y = (y + 1) / 2                                         # colour ops in [0, 1]
    s = color
    if s > 0:
        on = (torch.rand(b, 1, 1, 1, device=dev) < color_p).float()

        def factor():
            return 1 + on * torch.empty(b, 1, 1, 1, device=dev).uniform_(-s, s)

        y = (y * factor()).clamp(0, 1)                                           # brightness
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * factor() + mean).clamp(0, 1)                           # contrast
        if c == 3:
            lum = (0.299 * y[:, :1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:])
            y = ((y - lum) * factor() + lum).clamp(0, 1)                       # saturation
    if c == 3 and gray > 0:
        mono = (0.299 * y[:, :1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:]).expand_as(y)
        y = torch.where(torch.rand(b, 1, 1, 1, device=dev) < gray, mono, y)
    return y * 2 - 1



def nt_xent(h1, h2, tau):
    """PGMGAN's Eq. 4 (NT-Xent, SimCLR), as a loss to minimise, averaged over the 2N anchors:

        -1/2N sum_(i,j) log exp(sim(h_i, h_j)/tau) / sum_{k != i} exp(sim(h_i, h_k)/tau)

    h1, h2: (N, d) embeddings of two views of the same N images; (i, i+N) are the positive pairs,
    every other image of the 2N is a negative; sim is the cosine similarity.
    """
    n = h1.shape[0]
    z = F.normalize(torch.cat([h1, h2]).float(), dim=1)          # (2N, d)
    sim = z @ z.T / tau                                          # (2N, 2N)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def train_simclr(make_net, args, rt, dataset, method):
    """The SimCLR pretext stage: make_net() (a PretextNet, same weights on every rank) trained
    with nt_xent on two augmented views (simclr_augment) for --pretext-steps steps of
    --pretext-batch-size; its training state is args.out/pretext.pt (stage "pretext"), its log
    args.out/pretext/. A pretext.pt that stopped before --pretext-steps continues bit-for-bit with
    --resume; a finished one is left as it is.

    Under torchrun each rank contrasts its own share of the batch (negatives are not gathered
    across ranks, unlike SimCLR's large-batch TPU runs); gradients are averaged by DDP.
    """
    path = os.path.join(args.out, "pretext.pt")
    resumed = resume_checkpoint(path, args, method)
    if resumed is not None and resumed.get("step", args.pretext_steps) >= args.pretext_steps:
        return                                       # the stage is done
    net = make_net()
    seed_rank(rt, args.seed)
    net = rt.wrap(net)
    # SCAN simclr_*.yml: SGD momentum 0.9, no Nesterov, weight decay 1e-4; cosine from lr to
    # lr * 0.1^3 (SCAN steps it per epoch, we per step).
    opt = torch.optim.SGD(net.parameters(), lr=args.pretext_lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.pretext_steps, 1),
                                                       eta_min=args.pretext_lr * 1e-3)

    def views(x):                                    # one SimCLR view of each image
        return simclr_augment(x, args.aug_crop, args.aug_flip, args.aug_color, args.aug_color_p,
                              args.aug_gray)
    stream = BatchStream(dataset, args.pretext_batch_size, rt, seed=args.seed, num_workers=args.num_workers)
    nets = {"phi": unwrap(net).phi, "head": unwrap(net).head}
    opts = {"opt": opt, "sched": sched}
    step = 0 if resumed is None else restore_training_state(resumed, nets, opts, rt, stream, args.seed, path)
    log = Logger(os.path.join(args.out, "pretext"), rt.is_main, args.pretext_steps, start_step=step)
    meter = LossMeter(rt)
    log.info(f"plan: pretext (SimCLR, Eq. 4) {args.pretext_steps} steps x batch {args.pretext_batch_size} "
             f"(--pretext-steps, --pretext-batch-size), phi_0 {count_params(nets['phi'])} params")
    line = ProgressLine("pretext", args.pretext_steps - step, "steps", every=30, show=rt.is_main)

    def save(step):                                  # collective: every rank calls it
        save_training_state(path, method, args, step, nets, opts, rt, stream, stage="pretext", **run.state())
    run = RunControl(rt, args, step, meter, resumed, total=args.pretext_steps, path="pretext.pt",
                     stage="pretext", shorten="--pretext-steps", early=False)
    while run.going(step):
        step += 1
        x, _ = next(stream)
        with rt.autocast():
            # Both views in one forward (one DDP reduction, one power-iteration step).
            h = net(torch.cat([views(x), views(x)]))          # (2B, proj_dim)
        loss = nt_xent(*h.float().chunk(2), args.temperature)
        opt.zero_grad(set_to_none=True)
        rt.backward_step(loss, opt)
        sched.step()
        meter.add(nt_xent=loss)
        line.add()
        if step % args.log_every == 0 or step == args.pretext_steps:
            log_step(meter, log, step, path, lr=sched.get_last_lr()[0])
        if run.checkpoint_due(step):
            save(step)
    if resumed is None and step == 0:                # --pretext-steps 0: the network as initialised
        run.checkpoint_due(step)
        save(step)
    run.end(step)
    rt.barrier()


def load_simclr(net, args, method, device):
    """The finished pretext stage of train_simclr: args.out/pretext.pt loaded into `net` (a
    PretextNet), in eval mode on `device`; returns (net, the file's state). A pretext.pt that
    stopped before its --pretext-steps is a usage error (finish it with --resume)."""
    path = os.path.join(args.out, "pretext.pt")
    pre = load_checkpoint(path, method=method)
    if pre.get("step", pre["args"]["pretext_steps"]) < pre["args"]["pretext_steps"]:
        raise UsageError(f"{path} is a pretext stage stopped at step {pre['step']} of "
                         f"{pre['args']['pretext_steps']}: finish it with --resume")
    load_state(net.phi, pre["phi"], "pretext network", path)
    load_state(net.head, pre["head"], "pretext head", path)
    return net.to(device).eval(), pre

@torch.no_grad()
def knn_graph(feats, k, metric="cosine", chunk_mb=256.0, device=None, progress=None):
    """Indices (N, k) of the k nearest neighbours of every row of feats (N, d), self excluded.

    Computed block by block on `device`: a block of rows against all N rows, so the memory is
    rows x N floats (about `chunk_mb`), never N x N. metric: "cosine" (pretext features, as SCAN)
    or "euclidean" (raw 2-D coordinates). progress: a label for a progress line (None: silent).
    """
    device = device or feats.device
    n = feats.shape[0]
    if k >= n:
        raise UsageError(f"--neighbors {k} needs more than {k} points (have {n})")
    x = feats.to(device=device, dtype=torch.float32)
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    sq = (x * x).sum(1)                                          # (N,)
    rows = max(1, int(chunk_mb * 2 ** 20 / (4 * n)))
    out = torch.empty(n, k, dtype=torch.long)
    line = ProgressLine(progress, n, "rows", show=progress is not None)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        score = x[start:stop] @ x.T                              # (rows, N)
        if metric == "euclidean":
            score.mul_(2).sub_(sq[None, :])                      # -||a-b||^2 + ||a||^2 (row const)
        score[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")   # not itself
        out[start:stop] = score.topk(k, dim=1).indices.cpu()
        del score
        line.add(stop - start)
    return out


def entropy(p, eps=1e-8):
    """H_C(p) of categorical distributions along the last axis (natural log)."""
    return -(p * torch.log(p.clamp_min(eps))).sum(-1)


def clustering_metrics(pred, labels, k):
    """Partition sizes, and against the true labels (when the data has them): NMI (arithmetic
    normalisation, as sklearn's default), one-to-one accuracy (Hungarian matching of partitions to
    labels, SCAN's metric when k = #labels) and purity (each partition votes its majority label)."""
    from scipy.optimize import linear_sum_assignment

    sizes = torch.bincount(pred, minlength=k)
    out = {"partitions_used": int((sizes > 0).sum()), "partition_min": int(sizes.min()),
           "partition_max": int(sizes.max())}
    if labels is None:
        return out, sizes
    _, lab = torch.unique(labels, return_inverse=True)
    cont = torch.zeros(k, int(lab.max()) + 1, dtype=torch.float64)
    cont.index_put_((pred, lab), torch.ones(len(pred), dtype=torch.float64), accumulate=True)
    n = cont.sum()
    pij = cont / n
    pi, pj = pij.sum(1, keepdim=True), pij.sum(0, keepdim=True)
    nz = pij > 0
    mi = (pij[nz] * torch.log(pij[nz] / (pi @ pj)[nz])).sum()
    hi = -(pi[pi > 0] * torch.log(pi[pi > 0])).sum()
    hj = -(pj[pj > 0] * torch.log(pj[pj > 0])).sum()
    nmi = float(2 * mi / (hi + hj)) if float(hi + hj) > 0 else 1.0
    rows, cols = linear_sum_assignment(-cont.numpy())
    out.update(nmi=nmi, accuracy=float(cont.numpy()[rows, cols].sum() / n),
               purity=float(cont.max(1).values.sum() / n))
    return out, sizes


# ==================================================================================================
# 6. Architectures
# ==================================================================================================

# Every network the three scripts train, built from a handful of shared pieces. Sources:
#
#   MLP                      InvertGAN Sec. 5.1 ("four linear layers with ReLU") for G, D and F on
#                            2-D data; PGMGAN's 2-D D/G with a per-class head / label embedding.
#   DCGANGenerator/-Disc.    MaEM-GAN's CIFAR-10 / CelebA backbone. Kernel sizes, strides, bias-free
#                            convs and the orthogonal-initialised SN linear head are read from the
#                            official code (HaozheLiu-ST/MEE, models.py: DCGAN_G / DCGAN_D).
#   ResNetGenerator/-Disc.   SNGAN (Miyato et al. 2018, pfnet-research/sngan_projection) layouts at
#                            32 / 48 / 64 / 128, used by PGMGAN (Sec. 5: "architecture of SN-GAN"),
#                            InvertGAN's image D and MaEM-GAN's AnimeFace backbone.
#   InvertResNetGenerator,   InvertGAN Appendix A.2, Tables 4 and 3. The tables match, block for block
#   ResNetEncoder            (hidden width min(c_in, c_out), 1x1 shortcut only where channels change,
#                            3x3/stride-2 average pools), the ResnetBlock of Mescheder et al. 2018
#                            (LMescheder/GAN_stability, resnet2.py), so we take the details the tables
#                            leave out (LeakyReLU 0.2 pre-activation, residual scaled by 0.1, no
#                            normalisation, nearest upsampling, PyTorch's default init) from there.
#   StyleGAN2Generator/-D.   MaEM-GAN Table 7 (FFHQ): StyleGAN2 config F (Karras et al. 2020) with
#                            details from NVlabs/stylegan2-ada-pytorch; its G has no tanh.
#
# Conventions shared by all of them:
#   * G.forward(z, y=None) -> images in [-1, 1] (tanh), (B, channels, img_size, img_size); the MLP
#     generator returns flat vectors (B, data_dim) with no output activation (2-D data is not bounded).
#   * D.forward(x, y=None) -> (B, out_dim). A class-conditional D (n_classes > 0) has one output head
#     per class: with y it returns each sample's own head (B, out_dim); without y all heads
#     (B, n_classes, out_dim) (PGMGAN's guide and its rejection step look at every head).
#   * `width` is the base channel count; each class says how its channel numbers derive from it, and
#     width=64 always gives the paper's numbers.
#   * Spectral norm uses torch's parametrization API, so the raw weight lives at
#     `<layer>.parametrizations.weight.original` and `parametrize.is_parametrized(layer, "weight")`
#     tells whether a layer has it. Weights are initialised *before* SN is attached (so SN's first
#     power iterations see the final weights).

import copy

from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _torch_spectral_norm


def _check_size(arch, img_size, supported):
    """Raise a one-line UsageError if `arch` has no layout for `img_size`."""
    if img_size not in supported:
        sizes = ", ".join(str(s) for s in supported)
        raise UsageError(f"architecture '{arch}' supports img_size {sizes}; got {img_size}")


def _raw_weight(layer):
    """The trainable weight of a layer, also when spectral norm wraps it (the `original` tensor)."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def add_spectral_norm(module):
    """Put spectral norm (Miyato et al. 2018: W / sigma_max(W), one power iteration per training
    forward) on every Conv / ConvTranspose / Linear weight inside `module`, in place; returns it.
    Embeddings and norm layers are left alone (SNGAN puts SN on convs and linears only)."""
    for layer in list(module.modules()):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and \
                not parametrize.is_parametrized(layer, "weight"):
            _torch_spectral_norm(layer)  # eps 1e-12 (torch's); BigGAN-PyTorch's --SN_eps 1e-8 (utils.py): README
    return module


def init_weights(module, scheme):
    """Initialise every layer of `module` in place following one paper's code; returns `module`.

    scheme:
      "dcgan"   Radford et al. / MaEM official `weights_init`: conv and conv-transpose weights
                N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0. Linear layers orthogonal, as the
                official DCGAN_D initialises its (spectral-normed) output layer.
      "sngan"   SNGAN's Chainer code: GlorotUniform(sqrt(2)) on the two 3x3 convs of each residual
                branch (layers named `conv1` / `conv2`), GlorotUniform(1) on everything else
                (1x1 shortcuts, first linear, last conv, output heads); biases 0.
      "n02"     BigGAN's 'N02' (what PGMGAN's official config uses): N(0, 0.02) on every conv and
                linear weight, biases left as PyTorch made them.
      "default" PyTorch's own initialisation (Mescheder et al.'s GAN_stability does no re-init;
                used for InvertGAN's networks and the MLPs).
    Conditional-BN gain/bias embeddings are never touched: they start at 1 / 0 in every scheme
    (the bias-free linears of a vector-conditioned BN are linears like any other).
    Spectral-normed layers are handled (the raw `original` weight is initialised).
    """
    if scheme not in ("dcgan", "sngan", "n02", "default"):
        raise ValueError(f"unknown init scheme {scheme!r}")
    if scheme == "default":
        return module
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                w = _raw_weight(layer)
                if scheme == "dcgan":
                    if isinstance(layer, nn.Linear):
                        nn.init.orthogonal_(w)
                    else:
                        nn.init.normal_(w, 0.0, 0.02)
                elif scheme == "sngan":
                    residual = name.rsplit(".", 1)[-1] in ("conv1", "conv2")
                    nn.init.xavier_uniform_(w, gain=math.sqrt(2.0) if residual else 1.0)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)
                else:  # n02
                    nn.init.normal_(w, 0.0, 0.02)
            elif isinstance(layer, nn.BatchNorm2d) and layer.affine and scheme == "dcgan":
                nn.init.normal_(layer.weight, 1.0, 0.02)
                nn.init.zeros_(layer.bias)
    return module


class CondBatchNorm2d(nn.Module):
    """BatchNorm2d whose gain and bias are looked up per class (de Vries et al. 2017; SNGAN's
    conditional G, BigGAN). With n_classes=0 it is a plain affine BatchNorm2d.

    Official code (PGMGAN, BigGAN's ccbn): gain = 1 + Embedding(y) with the embedding drawn from
    N(0, 0.02); here gain = Embedding(y) started at exactly 1 and bias at 0, i.e. every class
    starts as the same unconditional BN (the difference is the 0.02 noise at step 0).

    cond_dim > 0 instead: gain = 1 + Linear(c), bias = Linear(c) of a conditioning *vector* c
    (B, cond_dim), no biases: BigGAN's ccbn fed by a linear layer (its `G_shared` path), used with
    c = z by the unconditional BigGAN (see BigGANGenerator). Those linears follow the owner's init.
    """

    def __init__(self, num_features, n_classes=0, cond_dim=0):
        super().__init__()
        if n_classes and cond_dim:
            raise ValueError("condition BN on classes or on a vector, not both")
        self.n_classes, self.cond_dim = n_classes, cond_dim
        self.bn = nn.BatchNorm2d(num_features, affine=(n_classes == 0 and cond_dim == 0))
        if n_classes > 0:
            self.gain = nn.Embedding(n_classes, num_features)
            self.bias = nn.Embedding(n_classes, num_features)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)
        elif cond_dim > 0:
            self.gain = nn.Linear(cond_dim, num_features, bias=False)
            self.bias = nn.Linear(cond_dim, num_features, bias=False)

    def forward(self, x, y=None):
        x = self.bn(x)
        if self.n_classes == 0 and self.cond_dim == 0:
            return x
        if y is None:
            raise ValueError("a conditional generator needs labels (or its conditioning vector) y")
        gain = self.gain(y) if self.n_classes else 1.0 + self.gain(y)          # (B, C)
        return x * gain[:, :, None, None] + self.bias(y)[:, :, None, None]     # (B, C, H, W)


class OutputHeads(nn.Module):
    """The last linear layer of every D: a shared head plus, if n_classes > 0, one head per class.

    out_c(h) = shared(h) + per_class_c(h). This is how PGMGAN's official D realises its k
    discriminators (biggan.py: `linear(h)` plus the row of `linear_c(h)` of the label): one shared
    trunk, a per-partition output. Adding a shared term to per-class weights spans the same linear
    maps as separate per-class heads, but the shared bias is one offset for all classes: without a
    per-class bias (the official `linear_c` has one; `bias` here is the shared one) a head can
    shift its output only through its weights. PGMGAN's build_gan says why ours has none.
    """

    def __init__(self, in_features, out_dim, n_classes=0, bias=True):
        super().__init__()
        # Spectral norm, where wanted, is added by the owning network after its init.
        self.out_dim, self.n_classes = out_dim, n_classes
        self.shared = nn.Linear(in_features, out_dim, bias=bias)
        self.per_class = nn.Linear(in_features, n_classes * out_dim, bias=False) if n_classes > 0 else None

    def forward(self, h, y=None):
        out = self.shared(h)  # (B, out_dim)
        if self.per_class is None:
            return out
        out = out.unsqueeze(1) + self.per_class(h).view(h.shape[0], self.n_classes, self.out_dim)
        if y is None:
            return out  # (B, n_classes, out_dim): every head
        return out[torch.arange(h.shape[0], device=h.device), y]  # (B, out_dim): each sample's head


_ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "elu": nn.ELU, "tanh": nn.Tanh}


class Maxout(nn.Module):
    """Maxout layer (Goodfellow et al. 2013): `pieces` linear maps, elementwise max.
    x (B, d_in) -> Linear to (B, d_out * pieces) -> view (B, d_out, pieces) -> max over pieces.
    The 2-D D of Self-Conditioned GAN's and PGMGAN's official code is three of these (5 pieces);
    each unit always passes a gradient to one of its pieces, so none goes dead as a ReLU unit can
    (a ReLU unit that is negative on every input stops learning)."""

    def __init__(self, d_in, d_out, pieces=5):
        super().__init__()
        self.d_out, self.pieces = d_out, pieces
        self.lin = nn.Linear(d_in, d_out * pieces)

    def forward(self, x):
        return self.lin(x).view(x.shape[0], self.d_out, self.pieces).amax(dim=2)  # (B, d_out)


class MLP(nn.Module):
    """n_layers Linear layers with `act` in between and nothing after the last (InvertGAN Sec. 5.1:
    G, D and F on the 2-D ring/grid are "four linear layers with ReLU"). Input is flattened.
    act="maxout": each Linear + activation pair is one Maxout layer with 5 pieces (the official
    PGMGAN / Self-Conditioned GAN 2-D D: three maxout layers of 200 units, then the heads).

    Conditioning (n_classes > 0), two kinds, chosen by `cond`:
      "head"  (a discriminator, PGMGAN 2-D D): the last layer is an OutputHeads; forward(x, y)
              -> (B, out_dim) for each sample's class, forward(x) -> (B, n_classes, out_dim).
      "input" (a generator, PGMGAN 2-D G): a learned per-class embedding of `embed_dim` numbers is
              *concatenated* to the input (z), as in Mescheder et al.'s conditional generators;
              forward(z, y) -> (B, out_dim).
    """

    def __init__(self, in_dim, out_dim, hidden=128, n_layers=4, act="relu", n_classes=0,
                 cond="head", embed_dim=32):
        super().__init__()
        if n_layers < 1:
            raise ValueError("MLP needs n_layers >= 1")
        if act not in _ACTIVATIONS and act != "maxout":
            raise ValueError(f"unknown activation {act!r}; choose from {sorted(_ACTIVATIONS) + ['maxout']}")
        if cond not in ("head", "input"):
            raise ValueError("cond must be 'head' or 'input'")
        self.n_classes, self.cond = n_classes, cond
        self.embed = nn.Embedding(n_classes, embed_dim) if (n_classes > 0 and cond == "input") else None
        dims = [in_dim + (embed_dim if self.embed is not None else 0)] + [hidden] * (n_layers - 1)
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [Maxout(a, b)] if act == "maxout" else [nn.Linear(a, b), _ACTIVATIONS[act]()]
        self.body = nn.Sequential(*layers)  # (B, hidden), empty when n_layers == 1
        head_classes = n_classes if cond == "head" else 0
        self.head = OutputHeads(dims[-1], out_dim, head_classes)

    def forward(self, x, y=None):
        x = x.flatten(1)  # (B, in_dim)
        if self.embed is not None:
            if y is None:
                raise ValueError("a class-conditional MLP generator needs labels y")
            x = torch.cat([x, self.embed(y)], dim=1)  # (B, in_dim + embed_dim)
        return self.head(self.body(x), y)


# ------------------------------------------------------------------------------------------------
# DCGAN (MaEM-GAN CIFAR-10 / CelebA)
# ------------------------------------------------------------------------------------------------


def _dcgan_channels(res, img_size, width, max_mult):
    """Channels of the DCGAN feature map at resolution `res` (G and D mirror each other).

    2*width at img_size/2, doubling at every halving of the resolution, so at img_size 32 and
    width 64: 16x16 -> 128, 8x8 -> 256, 4x4 -> 512 (the official models.py's G 512-256-128 / D
    128-256-512 at G_h_size = D_h_size = 128; the paper names DCGAN only).
    Official code: G_h_size * img_size/8 at 4x4 with no cap (1024 at 64, 4096 at 256); we cap at
    max_mult*width (512 by default) so large sizes stay trainable. max_mult=None = no cap (official).
    """
    ch = 2 * width * (img_size // 2) // res
    return ch if max_mult is None else min(ch, max_mult * width)


class DCGANGenerator(nn.Module):
    """DCGAN G (official MaEM DCGAN_G): z -> ConvT 4x4 s1 to 4x4 -> [ConvT 4x4 s2 p1 + BN + ReLU]
    until img_size/2 -> ConvT 4x4 s2 p1 to `channels` -> tanh. Bias-free convs (BN follows).
    Sizes 32/64/128/256 differ only in the number of stride-2 blocks. With n_classes > 0 every
    BN becomes a conditional BN (per-class gain/bias)."""

    def __init__(self, z_dim, img_size, channels=3, width=64, n_classes=0, max_mult=8):
        super().__init__()
        _check_size("dcgan", img_size, (32, 64, 128, 256))
        self.z_dim = z_dim
        res = [4 * 2 ** i for i in range(int(math.log2(img_size)) - 2)]  # 4, 8, ..., img_size/2
        ch = [_dcgan_channels(r, img_size, width, max_mult) for r in res]
        # convs[0]: (B, z, 1, 1) -> (B, ch0, 4, 4); convs[i]: doubles the resolution.
        self.convs = nn.ModuleList(
            [nn.ConvTranspose2d(z_dim, ch[0], 4, 1, 0, bias=False)]
            + [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False) for a, b in zip(ch[:-1], ch[1:])])
        self.norms = nn.ModuleList([CondBatchNorm2d(c, n_classes) for c in ch])
        self.to_img = nn.ConvTranspose2d(ch[-1], channels, 4, 2, 1, bias=False)
        init_weights(self, "dcgan")

    def forward(self, z, y=None):
        h = z.view(z.shape[0], self.z_dim, 1, 1)  # (B, z, 1, 1)
        for conv, norm in zip(self.convs, self.norms):
            h = F.relu(norm(conv(h), y))  # (B, ch_r, r, r), r = 4 ... img_size/2
        return torch.tanh(self.to_img(h))  # (B, channels, img_size, img_size)


class DCGANDiscriminator(nn.Module):
    """DCGAN D (official MaEM DCGAN_D): [Conv 4x4 s2 p1 + LeakyReLU 0.2] from img_size down to
    4x4, no BN, bias-free convs, spectral norm on every conv and on the linear head
    (ch*4*4 -> out_dim, orthogonal init, no bias). MaEM-GAN reads its m-dim code (or mu/logvar:
    out_dim = 2m) from this head."""

    def __init__(self, img_size, channels=3, width=64, out_dim=1, n_classes=0, spectral_norm=True,
                 max_mult=8, conv_bias=False):
        super().__init__()
        _check_size("dcgan", img_size, (32, 64, 128, 256))
        res = [img_size // 2 ** i for i in range(1, int(math.log2(img_size)) - 1)]  # img/2 ... 4
        ch = [_dcgan_channels(r, img_size, width, max_mult) for r in res]
        # conv_bias=False is MaEM's official D. With no bias anywhere and LeakyReLU, D is
        # positively homogeneous (D(c x) = c D(x)); trained with the hinge loss (pgm_gan.py) such a
        # D left G's samples grey for thousands of steps, while with conv biases G learned the
        # data's brightness in 50 steps. pgm_gan.py therefore passes conv_bias=True.
        self.convs = nn.ModuleList([nn.Conv2d(a, b, 4, 2, 1, bias=conv_bias)
                                    for a, b in zip([channels] + ch[:-1], ch)])
        self.head = OutputHeads(ch[-1] * 4 * 4, out_dim, n_classes, bias=False)
        init_weights(self, "dcgan")
        if spectral_norm:
            add_spectral_norm(self)

    def forward(self, x, y=None):
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)  # (B, ch_r, r, r), r = img_size/2 ... 4
        return self.head(h.flatten(1), y)  # (B, out_dim) or (B, n_classes, out_dim)


# ------------------------------------------------------------------------------------------------
# PacGAN / Unrolled GAN stacked-MNIST nets (the reduced-discriminator benchmark)
# ------------------------------------------------------------------------------------------------
# Layouts from PacGAN's model.py (fjxmlzn/PacGAN, stacked_MNIST_experiments/unrolled_GAN_experiment/
# D=0.25G and D=0.5G), itself after Unrolled GAN's App. E: 3x3 kernels, TensorFlow 'SAME' padding,
# BN (eps 1e-5, TF decay 0.9 = torch momentum 0.1) after every layer but D's first input and the
# outputs. Init: N(0, 0.02) weights (truncated at 2 std for convs, as TF's truncated_normal), zero
# biases, BN gain 1. Official code: PacGAN's celeba_experiments/ops.py (the DCGAN-TensorFlow ops;
# the stacked folder's model.py imports the same family).


def _tf_same_pads(size, stride, k=3):
    """TensorFlow 'SAME' padding of a k-wide conv with `stride` on `size` pixels: (before, after).
    The output has ceil(size / stride) pixels; an odd total pad puts the extra pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


class PacGANGenerator(nn.Module):
    """PacGAN's stacked-MNIST G (287,875 parameters at z_dim 256, width 8): z -> linear to 64x4x4
    -> BN -> ReLU -> [3x3 stride-2 transposed conv + BN + ReLU] to 32@7, 16@14, 8@28 -> 3x3 conv
    to `channels` -> tanh. width w gives 8w/4w/2w/w channels. n_classes > 0 makes every BN
    conditional (PGMGAN's per-partition G)."""

    def __init__(self, z_dim, img_size=28, channels=3, width=8, n_classes=0):
        super().__init__()
        _check_size("pacgan", img_size, (28,))
        self.z_dim, self.c0 = z_dim, 8 * width
        ch = [8 * width, 4 * width, 2 * width, width]
        self.fc = nn.Linear(z_dim, ch[0] * 4 * 4)
        self.norms = nn.ModuleList([CondBatchNorm2d(c, n_classes) for c in ch])
        self.deconvs = nn.ModuleList([nn.ConvTranspose2d(a, b, 3, 2) for a, b in zip(ch[:-1], ch[1:])])
        self.sizes = [7, 14, 28]           # each transposed conv is the adjoint of a SAME conv size -> size/2
        self.to_img = nn.Conv2d(ch[-1], channels, 3, 1, 1)
        with torch.no_grad():
            for layer in (self.fc, *self.deconvs):
                nn.init.normal_(layer.weight, 0.0, 0.02)
                nn.init.zeros_(layer.bias)
            nn.init.trunc_normal_(self.to_img.weight, 0.0, 0.02, -0.04, 0.04)
            nn.init.zeros_(self.to_img.bias)

    def forward(self, z, y=None):
        # TF lays the linear's 1024 outputs out as (4, 4, 64); ours as (64, 4, 4): a fixed
        # permutation of the linear's rows, the same function class and init.
        h = F.relu(self.norms[0](self.fc(z).view(-1, self.c0, 4, 4), y))       # (B, 8w, 4, 4)
        for deconv, norm, size in zip(self.deconvs, self.norms[1:], self.sizes):
            before, _ = _tf_same_pads(size, 2)
            h = deconv(h)[:, :, before:before + size, before:before + size]    # full (2n+1) -> SAME crop
            h = F.relu(norm(h, y))                                             # (B, c, size, size)
        return torch.tanh(self.to_img(h))                                      # (B, channels, 28, 28)


class PacGANDiscriminator(nn.Module):
    """PacGAN's reduced D: [3x3 stride-2 conv (SAME) + BN + LeakyReLU 0.3] to width@14, 2width@7,
    4width@4, then a linear 16*4width -> out_dim. width 2 is 'D = 0.25G' (585 parameters with a
    scalar head), width 4 'D = 0.5G' (1,889). out_dim / n_classes: the heads MaEM-GAN (m-dim code)
    and PGMGAN (one output per partition) need, through OutputHeads."""

    def __init__(self, img_size=28, channels=3, width=2, out_dim=1, n_classes=0):
        super().__init__()
        _check_size("pacgan", img_size, (28,))
        ch = [width, 2 * width, 4 * width]
        self.convs = nn.ModuleList([nn.Conv2d(a, b, 3, 2) for a, b in zip([channels] + ch[:-1], ch)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) for c in ch])
        self.sizes = [28, 14, 7]           # input size of each conv
        self.head = OutputHeads(ch[-1] * 4 * 4, out_dim, n_classes, bias=True)
        with torch.no_grad():
            for conv in self.convs:
                nn.init.trunc_normal_(conv.weight, 0.0, 0.02, -0.04, 0.04)
                nn.init.zeros_(conv.bias)
            for lin in (self.head.shared, self.head.per_class):
                if lin is not None:
                    nn.init.normal_(lin.weight, 0.0, 0.02)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)

    def forward(self, x, y=None):
        h = x
        for conv, norm, size in zip(self.convs, self.norms, self.sizes):
            before, after = _tf_same_pads(size, 2)
            h = F.leaky_relu(norm(conv(F.pad(h, (before, after, before, after)))), 0.3)
        return self.head(h.flatten(1), y)   # (B, out_dim) or (B, n_classes, out_dim)


class PacGANEncoder(nn.Module):
    """InvertGAN's F for --arch pacgan (ours: sized like G, as InvertGAN's Table 3 F mirrors its
    Table 4 G): G's layers in reverse, a 3x3 conv to width@28, [3x3 stride-2 SAME conv +
    LeakyReLU 0.2] to 2w@14, 4w@7, 8w@4, linear 16*8w -> out_dim (286,928 parameters at w 8,
    out_dim 256; G 287,875). No normalisation (as InvertGAN's F, common.InvertResBlock): F(x_i)
    must not depend on the other samples of the batch (Prop. 1). PyTorch's default init (ours)."""

    def __init__(self, img_size=28, channels=3, out_dim=256, width=8):
        super().__init__()
        _check_size("pacgan", img_size, (28,))
        ch = [width, 2 * width, 4 * width, 8 * width]
        self.from_img = nn.Conv2d(channels, ch[0], 3, 1, 1)
        self.convs = nn.ModuleList([nn.Conv2d(a, b, 3, 2) for a, b in zip(ch[:-1], ch[1:])])
        self.sizes = [28, 14, 7]
        self.fc = nn.Linear(ch[-1] * 4 * 4, out_dim)

    def forward(self, x):
        h = F.leaky_relu(self.from_img(x), 0.2)                               # (B, w, 28, 28)
        for conv, size in zip(self.convs, self.sizes):
            before, after = _tf_same_pads(size, 2)
            h = F.leaky_relu(conv(F.pad(h, (before, after, before, after))), 0.2)
        return self.fc(h.flatten(1))                                          # (B, out_dim)


# ------------------------------------------------------------------------------------------------
# SNGAN-style ResNets (PGMGAN, InvertGAN's image D, MaEM-GAN AnimeFace)
# ------------------------------------------------------------------------------------------------

# Per image size: G starts from bottom x bottom; `g` lists G's channels as multiples of `width`
# (input of each up-block, then the output of the last: len(g) - 1 up-blocks); `d` lists D's block
# output channels and `down` which D blocks halve the resolution (the first one is SNGAN's
# "optimized" block). With width=64 these are SNGAN's ResNet layouts (Miyato et al. 2018, appendix;
# the 64 and 128 ones as in the SNGAN 64/128 networks of later re-implementations):
#   32  (CIFAR):  G 256 ch from 4x4, 3 up-blocks;    D 128 ch, 4 blocks, 32 -> 16 -> 8 -> 8 -> 8
#   48  (STL-10): G 512 -> 64 from 6x6, 3 up-blocks; D 64 -> 1024, 48 -> 24 -> 12 -> 6 -> 3 -> 3
#   64:           G 1024 -> 64 from 4x4, 4 blocks;   D 64 -> 1024, 64 -> ... -> 2
#   128:          G 1024 -> 64 from 4x4, 5 blocks;   D 64 -> 1024 -> 1024, 128 -> ... -> 4 -> 4
# Official code (PGMGAN, BigGAN code base): at 32 it uses 256 channels in D as well ("wide" D),
# SN also in G, and N(0, 0.02) init; we follow SNGAN, which its paper cites (Sec. 5). Pass
# init="n02" / spectral_norm=True (G) for the official choices.
_RESNET_LAYOUTS = {
    32: dict(bottom=4, g=(4, 4, 4, 4), d=(2, 2, 2, 2), down=(True, True, False, False)),
    48: dict(bottom=6, g=(8, 4, 2, 1), d=(1, 2, 4, 8, 16), down=(True, True, True, True, False)),
    64: dict(bottom=4, g=(16, 8, 4, 2, 1), d=(1, 2, 4, 8, 16), down=(True,) * 5),
    128: dict(bottom=4, g=(16, 16, 8, 4, 2, 1), d=(1, 2, 4, 8, 16, 16),
              down=(True, True, True, True, True, False)),
}


class GBlock(nn.Module):
    """SNGAN generator block: (c)BN - ReLU - up x2 - conv3x3 - (c)BN - ReLU - conv3x3, plus a
    shortcut up x2 - conv1x1 (always learned: the block upsamples). Nearest-neighbour upsampling
    as SNGAN's unpooling and BigGAN's F.interpolate."""

    def __init__(self, c_in, c_out, n_classes=0, cond_dim=0):
        super().__init__()
        self.bn1 = CondBatchNorm2d(c_in, n_classes, cond_dim)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.bn2 = CondBatchNorm2d(c_out, n_classes, cond_dim)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, y=None):
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2)  # (B, c_in, 2H, 2W)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))  # (B, c_out, 2H, 2W)
        return h + self.shortcut(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """SNGAN discriminator block: ReLU - conv3x3 - ReLU - conv3x3 (- avgpool 2), shortcut
    conv1x1 (- avgpool 2) when channels change or it downsamples, identity otherwise.
    Hidden width = c_in (SNGAN's BlockDisc). `first=True` is SNGAN's "optimized" first block:
    no ReLU on the raw image, hidden width c_out. Shortcut: a 1x1 conv and a 2x2 average pool
    commute (both linear and per-pixel / per-channel), so we pool first, the cheaper order."""

    def __init__(self, c_in, c_out, downsample, first=False):
        super().__init__()
        self.downsample, self.first = downsample, first
        hidden = c_out if first else c_in
        self.conv1 = nn.Conv2d(c_in, hidden, 3, 1, 1)
        self.conv2 = nn.Conv2d(hidden, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if (c_in != c_out or downsample) else None

    def forward(self, x):
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))  # (B, c_out, H, W)
        sc = x
        if self.downsample:
            h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)  # (B, ., H/2, W/2)
        if self.shortcut is not None:
            sc = self.shortcut(sc)
        return h + sc


class ResNetGenerator(nn.Module):
    """SNGAN ResNet G: Linear(z -> c0*b*b) -> (B, c0, b, b) -> GBlocks (x2 each) -> BN - ReLU -
    conv3x3 -> tanh. Layout from _RESNET_LAYOUTS[img_size]; channels = multiples of `width`.
    n_classes > 0: conditional BN in every block (the final BN stays unconditional, as in SNGAN).
    Init "sngan" (GlorotUniform, see init_weights); spectral_norm=True adds SN to every layer
    (BigGAN / PGMGAN official); off by default as in SNGAN."""

    def __init__(self, z_dim, img_size, channels=3, width=64, n_classes=0, init="sngan",
                 spectral_norm=False, z_cond=False, attention=(), arch="resnet"):
        super().__init__()
        layouts = _BIGGAN_LAYOUTS if arch == "biggan" else _RESNET_LAYOUTS
        _check_size(arch, img_size, tuple(layouts))
        layout = layouts[img_size]
        ch = [m * width for m in layout["g"]]
        self.bottom, self.c0, self.z_cond = layout["bottom"], ch[0], z_cond
        self.linear = nn.Linear(z_dim, ch[0] * self.bottom ** 2)
        blocks, res = [], self.bottom
        for a, b in zip(ch[:-1], ch[1:]):
            res *= 2
            blocks.append(GBlock(a, b, n_classes, cond_dim=z_dim if z_cond else 0))
            if res in attention:
                blocks.append(SelfAttention(b))
        self.blocks = nn.ModuleList(blocks)
        self.bn = nn.BatchNorm2d(ch[-1])
        self.to_img = nn.Conv2d(ch[-1], channels, 3, 1, 1)
        init_weights(self, init)
        if spectral_norm:
            add_spectral_norm(self)

    def forward(self, z, y=None):
        cond = z if self.z_cond else y        # the unconditional BigGAN's BN reads z itself
        h = self.linear(z).view(z.shape[0], self.c0, self.bottom, self.bottom)  # (B, c0, b, b)
        for block in self.blocks:
            h = block(h, cond)  # (B, c_i, 2r, 2r)
        return torch.tanh(self.to_img(F.relu(self.bn(h))))  # (B, channels, img_size, img_size)


class ResNetDiscriminator(nn.Module):
    """SNGAN ResNet D: optimized first DBlock, then DBlocks (_RESNET_LAYOUTS[img_size]) -> ReLU ->
    global *sum* pooling -> linear head(s). Spectral norm on every conv and linear.
    n_classes > 0: per-class output heads (OutputHeads)."""

    def __init__(self, img_size, channels=3, width=64, out_dim=1, n_classes=0, init="sngan",
                 attention=(), arch="resnet"):
        super().__init__()
        layouts = _BIGGAN_LAYOUTS if arch == "biggan" else _RESNET_LAYOUTS
        _check_size(arch, img_size, tuple(layouts))
        layout = layouts[img_size]
        ch = [m * width for m in layout["d"]]
        blocks, res = [], img_size
        for i, (a, b, down) in enumerate(zip([channels] + ch[:-1], ch, layout["down"])):
            blocks.append(DBlock(a, b, down, first=(i == 0)))
            res //= 2 if down else 1
            if res in attention:
                # ours: once, after the first block at that resolution (BigGAN-PyTorch's D_arch[32]
                # labels all four blocks 16, so its D_attn 16 adds one after every block)
                blocks.append(SelfAttention(b))
                attention = tuple(r for r in attention if r != res)
        self.blocks = nn.ModuleList(blocks)
        self.head = OutputHeads(ch[-1], out_dim, n_classes)
        init_weights(self, init)
        add_spectral_norm(self)

    def forward(self, x, y=None):
        h = x
        for block in self.blocks:
            h = block(h)  # (B, c_i, r_i, r_i)
        h = F.relu(h).sum(dim=(2, 3))  # (B, c_last): SNGAN sums (not averages) over positions
        return self.head(h, y)


# BigGAN at 32x32 (Brock et al. 2019), unconditional, for MaEM-GAN's Table 6: the SNGAN pieces
# above with BigGAN's CIFAR layout. Official code (BigGAN-PyTorch, BigGAN.py G_arch / D_arch[32]):
# G 4ch -> 4ch x3 upsampling blocks from 4x4; D 3 -> 4ch -> 4ch x3 with downsampling in the first
# two, "wide" blocks (hidden = c_out, what DBlock does when c_in == c_out or first=True); SN on every
# conv and linear of G and D; N02 init and no attention on CIFAR-10 (launch_cifar_ema.sh: --G_init /
# --D_init N02, --G_attn 0 --D_attn 0; orthogonal init is the paper's ImageNet setting); attention
# only where `attention` asks. Ours, for the unconditional model of the MaEM paper's Table 6: G's
# conditional BN reads z through two bias-free linears (gain 1 + W_g z, bias W_b z: BigGAN's ccbn on
# its shared path with z in place of the class embedding) and D has no class projection, only its
# linear head (out_dim 1, or 2m for MaEM-GAN's code).
_BIGGAN_LAYOUTS = {32: dict(bottom=4, g=(4, 4, 4, 4), d=(4, 4, 4, 4), down=(True, True, False, False))}


class SelfAttention(nn.Module):
    """The non-local block of SAGAN (Zhang et al. 2019) as BigGAN inserts it after a residual block
    (Official code: BigGAN-PyTorch layers.py, Attention): 1x1 bias-free convs theta, phi (C -> C/8)
    and g (C -> C/2), phi and g max-pooled 2x2, attention softmax(theta^T phi) over the pooled
    positions, an output 1x1 conv (C/2 -> C), and out = x + gamma * o with gamma learned from 0
    (so the block starts as the identity). forward(x, y=None) ignores y (it sits among G blocks)."""

    def __init__(self, ch):
        super().__init__()
        self.theta = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.phi = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.g = nn.Conv2d(ch, ch // 2, 1, bias=False)
        self.o = nn.Conv2d(ch // 2, ch, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x, y=None):
        B, C, H, W = x.shape
        theta = self.theta(x).flatten(2)                                   # (B, C/8, HW)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)                      # (B, C/8, HW/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)                          # (B, C/2, HW/4)
        attn = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)          # (B, HW, HW/4)
        o = self.o((g @ attn.transpose(1, 2)).view(B, C // 2, H, W))       # (B, C, H, W)
        return x + self.gamma * o


# ------------------------------------------------------------------------------------------------
# InvertGAN's real-image G and F (Appendix A.2, Tables 3 and 4)
# ------------------------------------------------------------------------------------------------


class InvertResBlock(nn.Module):
    """ResnetBlock of InvertGAN Tables 3-4: conv3x3 (c_in -> min(c_in, c_out)), conv3x3 (-> c_out),
    and a 1x1 bias-free shortcut only where c_in != c_out (the tables' "1x1, C" rows).
    From Mescheder et al.'s GAN_stability, which the tables match: LeakyReLU(0.2) before each
    conv, no normalisation, and out = shortcut + 0.1 * residual (`res_scale`; the small factor keeps
    a deep unnormalised stack near identity at initialisation)."""

    def __init__(self, c_in, c_out, res_scale=0.1):
        super().__init__()
        hidden = min(c_in, c_out)
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(c_in, hidden, 3, 1, 1)
        self.conv2 = nn.Conv2d(hidden, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x):
        dx = self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.2)), 0.2))  # (B, c_out, H, W)
        sc = x if self.shortcut is None else self.shortcut(x)
        return sc + self.res_scale * dx


class InvertResNetGenerator(nn.Module):
    """InvertGAN Table 4. At img_size 32, width 64:
        Linear z -> 8192 = (512, 4, 4)
        ResnetBlock 512 -> 256 at 4x4,   Upsample x2 -> 8x8
        ResnetBlock 256 -> 128 at 8x8,   Upsample x2 -> 16x16
        ResnetBlock 128 -> 64  at 16x16, Upsample x2 -> 32x32
        ResnetBlock 64 -> 64   at 32x32
        Conv2d 3x3 64 -> channels (after LeakyReLU, as GAN_stability), tanh (ours: the table ends
        at the conv; tanh keeps images in [-1, 1] as every G here)
    i.e. each block works *before* its upsampling (ours: our reading of the table's row order and
    output sizes; GAN_stability's own generator upsamples first). img_size 48 (STL-10, not in the paper's table): the same stack
    from 6x6 (Linear to 512*6*6 = 18432), 6 -> 12 -> 24 -> 48. Channels: 8w, 4w, 2w, w, w."""

    def __init__(self, z_dim, img_size=32, channels=3, width=64, res_scale=0.1):
        super().__init__()
        _check_size("invert-resnet", img_size, (32, 48))
        self.s0, self.c0 = img_size // 8, 8 * width
        ch = [8 * width, 4 * width, 2 * width, width, width]
        self.linear = nn.Linear(z_dim, self.c0 * self.s0 ** 2)
        self.blocks = nn.ModuleList([InvertResBlock(a, b, res_scale) for a, b in zip(ch[:-1], ch[1:])])
        self.to_img = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, z, y=None):
        h = self.linear(z).view(z.shape[0], self.c0, self.s0, self.s0)  # (B, 8w, s0, s0)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i < len(self.blocks) - 1:
                h = F.interpolate(h, scale_factor=2)  # (B, c, 2r, 2r) after the block: ours, Table 4's row order
        return torch.tanh(self.to_img(F.leaky_relu(h, 0.2)))  # (B, C, S, S); tanh ours: images in [-1, 1]


class ResNetEncoder(nn.Module):
    """InvertGAN's inverse network F, Table 3. At img_size 32, width 64:
        Conv2d 3x3 channels -> 64 at 32x32
        ResnetBlock 64 -> 64 at 32x32,    AvgPool 3x3 s2 (pad 1, ours: the table's 16x16 needs it) -> 16x16
        ResnetBlock 64 -> 128 at 16x16,   AvgPool -> 8x8
        ResnetBlock 128 -> 256 at 8x8,    AvgPool -> 4x4
        ResnetBlock 256 -> 512 at 4x4
        Linear 512*4*4 -> out_dim (20 in the table; the latent dim in practice), after LeakyReLU
    img_size 48 (STL-10): the same three poolings (48 -> 24 -> 12 -> 6) and a Linear from 512*6*6,
    so the layer list is unchanged and only the flattened size grows."""

    def __init__(self, img_size, channels=3, out_dim=20, width=64, res_scale=0.1):
        super().__init__()
        _check_size("invert-resnet", img_size, (32, 48))
        ch = [width, width, 2 * width, 4 * width, 8 * width]
        self.from_img = nn.Conv2d(channels, width, 3, 1, 1)
        self.blocks = nn.ModuleList([InvertResBlock(a, b, res_scale) for a, b in zip(ch[:-1], ch[1:])])
        self.linear = nn.Linear(8 * width * (img_size // 8) ** 2, out_dim)

    def forward(self, x):
        h = self.from_img(x)  # (B, w, S, S)
        for i, block in enumerate(self.blocks):
            if i > 0:
                h = F.avg_pool2d(h, 3, stride=2, padding=1)  # (B, c, S/2, S/2); padding ours: Table 3's sizes
            h = block(h)
        return self.linear(F.leaky_relu(h, 0.2).flatten(1))  # (B, out_dim)


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------

ARCHS = ("mlp", "dcgan", "resnet", "invert-resnet", "biggan", "pacgan")
_DEFAULT_WIDTH = {"mlp": 128, "dcgan": 64, "resnet": 64, "invert-resnet": 64, "biggan": 64,
                  "pacgan": 8}   # pacgan: G's last width; build_discriminator takes its own (2 = D 1/4)


def _check_arch(arch):
    if arch not in ARCHS:
        raise UsageError(f"unknown architecture '{arch}'; choose from {', '.join(ARCHS)}")


def _mlp_dim(img_size, channels):
    """"mlp" is for flat vectors: the caller passes img_size=1 and channels=data dimension
    (2 for the ring/grid), so the data is (B, channels)."""
    if img_size != 1:
        raise UsageError(f"architecture 'mlp' is for flat vectors (pass img_size=1); got img_size {img_size}")
    return channels


def build_generator(arch, z_dim, img_size, channels, width=None, n_classes=0, attention=()):
    """G for `arch` in ARCHS. forward(z, y=None) -> (B, channels, img_size, img_size) in [-1, 1];
    for "mlp" -> (B, channels) with no output activation. width=None = the arch's default
    (hidden 128 for mlp, 64 otherwise). "invert-resnet" and "biggan" are unconditional;
    `attention`: resolutions of BigGAN's self-attention blocks."""
    _check_arch(arch)
    width = width or _DEFAULT_WIDTH[arch]
    if arch == "biggan":
        if n_classes:
            raise UsageError("architecture 'biggan' here is BigGAN's unconditional model")
        return ResNetGenerator(z_dim, img_size, channels, width, init="n02", spectral_norm=True,
                               z_cond=True, attention=attention, arch="biggan")
    if arch == "mlp":
        return MLP(z_dim, _mlp_dim(img_size, channels), hidden=width, n_classes=n_classes, cond="input")
    if arch == "dcgan":
        return DCGANGenerator(z_dim, img_size, channels, width, n_classes)
    if arch == "pacgan":
        return PacGANGenerator(z_dim, img_size, channels, width, n_classes)
    if arch == "resnet":
        return ResNetGenerator(z_dim, img_size, channels, width, n_classes)
    if n_classes:
        raise UsageError("architecture 'invert-resnet' has no class-conditional generator")
    return InvertResNetGenerator(z_dim, img_size, channels, width)


def build_discriminator(arch, img_size, channels, width=None, out_dim=1, n_classes=0, conv_bias=False,
                        mlp_act="relu", attention=()):
    """D for `arch`. forward(x, y=None) -> (B, out_dim); conditional D without y -> (B, n_classes,
    out_dim). "invert-resnet" uses the SNGAN ResNet D (InvertGAN A.2 gives no D table).
    conv_bias: biases in the DCGAN D's convs (see DCGANDiscriminator; the other Ds always have them).
    mlp_act: the "mlp" D's activation ("relu", or "maxout" as in PGMGAN's official 2-D D)."""
    _check_arch(arch)
    if arch == "pacgan":
        return PacGANDiscriminator(img_size, channels, width or 2, out_dim, n_classes)
    width = width or _DEFAULT_WIDTH[arch]
    if arch == "mlp":
        return MLP(_mlp_dim(img_size, channels), out_dim, hidden=width, n_classes=n_classes, cond="head",
                   act=mlp_act)
    if arch == "dcgan":
        return DCGANDiscriminator(img_size, channels, width, out_dim, n_classes, conv_bias=conv_bias)
    if arch == "biggan":
        if n_classes:
            raise UsageError("architecture 'biggan' here is BigGAN's unconditional model")
        return ResNetDiscriminator(img_size, channels, width, out_dim, init="n02", attention=attention,
                                   arch="biggan")
    return ResNetDiscriminator(img_size, channels, width, out_dim, n_classes)


# --- PacGAN's stacked benchmark (--arch pacgan in every script; tests/bench_pacgan.py) ----------
PACGAN_DATASETS = ("stacked-mnist", "stacked-fashion-mnist")
PACGAN_BATCH = 128      # PacGAN model.py / config.py: batch 128, also the sampler's batch (its BN on batch statistics)


def check_pacgan(dataset, img_size):
    """--arch pacgan is PacGAN's stacked-MNIST protocol: stacked data at 28x28, nothing else."""
    if dataset not in PACGAN_DATASETS:
        raise UsageError(f"--arch pacgan is for {' / '.join(PACGAN_DATASETS)} (PacGAN's stacked MNIST), "
                         f"not {dataset}")
    if img_size != 28:
        raise UsageError(f"--arch pacgan runs at 28x28 (PacGAN's networks), not --img-size {img_size}")


def has_batch_norm(net):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in unwrap(net).modules())


def d_real_fake(D, real, fake, y_real=None, y_fake=None):
    """D's outputs on the real and on the fake batch. One forward of both (one DDP reduction)
    unless D has BatchNorm (the pacgan D): then each batch on its own, as PacGAN's model.py, so
    that neither batch's BN statistics mix into the other's outputs."""
    cond = y_real is not None
    if has_batch_norm(D):
        return (D(real, y_real) if cond else D(real)), (D(fake, y_fake) if cond else D(fake))
    both = torch.cat([real, fake.to(real.dtype)])
    out = D(both, torch.cat([y_real, y_fake])) if cond else D(both)
    return out[:len(real)], out[len(real):]


@torch.no_grad()
def sample_bn_batch(G, z, y=None, batch=PACGAN_BATCH):
    """G(z) in batches of `batch`, every BN on that batch's statistics (running statistics left
    as they were): PacGAN's sampler (its TF batch_norm never leaves training mode)."""
    with batch_norm_from_batch(G):
        return torch.cat([G(z[i:i + batch]) if y is None else G(z[i:i + batch], y[i:i + batch])
                          for i in range(0, len(z), batch)])


def build_encoder(arch, img_size, channels, out_dim, width=None):
    """InvertGAN's F: x -> (B, out_dim). "mlp" (2-D data), "invert-resnet" (Table 3) or "pacgan"
    (PacGANEncoder, sized like G)."""
    _check_arch(arch)
    width = width or _DEFAULT_WIDTH[arch]
    if arch == "mlp":
        return MLP(_mlp_dim(img_size, channels), out_dim, hidden=width)
    if arch == "invert-resnet":
        return ResNetEncoder(img_size, channels, out_dim, width)
    if arch == "pacgan":
        return PacGANEncoder(img_size, channels, out_dim, width)
    raise UsageError(f"no encoder for architecture '{arch}'; use 'mlp', 'invert-resnet' or 'pacgan'")


# ------------------------------------------------------------------------------------------------
# StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"): compact, for reading
# ------------------------------------------------------------------------------------------------

# Config F of the paper (Sec. 2.2 weight demodulation, Sec. 3.1 lazy regularisation, Sec. 3.2 path
# length regularisation, Sec. 4 / Fig. 7: skip G, residual D), written for reading rather than speed.
# What the paper leaves out is read from the official PyTorch port, NVlabs/stylegan2-ada-pytorch
# (training/networks.py, training/loss.py, train.py); comments cite the file. Resampling is the
# official one (see _fir_kernel below): loaded with the official weights, our nets give the official
# outputs to 5e-6 (tests/test_stylegan2_official.py). Where we differ (ours):
#   * no fp16 layers and no activation clamp (every ada-pytorch config runs its 4 highest
#     resolutions in fp16 and clamps at 256; the original StyleGAN2 did neither);
#   * no class conditioning; always the fused (grouped-conv) modulation.
# Init as the official code: every equalised-lr weight N(0, 1) (divided by lr_mult), biases 0,
# except the style affines whose bias starts at 1 (so styles start near 1); noise strengths 0.
# G has no tanh (neither has StyleGAN2): its images are unbounded, near [-1, 1] once trained.

_SQRT2 = math.sqrt(2.0)


def _lrelu(x, bias=None):
    """Biased leaky ReLU (slope 0.2) times sqrt(2), which keeps the second moment of N(0, 1)
    inputs near 1 (He et al. 2015). Official code: torch_utils/ops/bias_act.py ('lrelu', def_gain)."""
    if bias is not None:
        x = x + (bias.view(1, -1, 1, 1) if x.dim() == 4 else bias)
    return F.leaky_relu(x, 0.2) * _SQRT2


# Resampling (StyleGAN, Karras et al. 2019, Sec. 2: low-pass filter after each upsampling and before
# each downsampling, after Zhang 2019). Official code (torch_utils/ops/upfirdn2d.py: setup_filter,
# upsample2d, downsample2d; training/networks.py: resample_filter=[1,3,3,1]): the separable taps
# [1,3,3,1], as their 4x4 outer product divided by its sum, zero padding at the borders. x2 upsampling
# = zeros inserted after each pixel, then the filter times 4 (a quarter of the taps meet a nonzero
# pixel). Written with depthwise conv2d / conv_transpose2d on a fixed buffer (fast on a GPU); the
# kernel is symmetric, so correlation (F.conv2d) and convolution agree. The buffer is not persistent:
# state dicts keep the official keys minus the filters (official: one `resample_filter` per layer).


def _fir_kernel():
    """(4, 4) low-pass kernel outer([1,3,3,1], [1,3,3,1]) / 64; it sums to 1."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum()


def _depthwise(kernel, x, gain=1.0):
    """The kernel times gain, once per channel of x: (C, 1, 4, 4), x's dtype and device."""
    return (kernel * gain).to(x.dtype).expand(x.shape[1], 1, *kernel.shape)


def fir_filter2d(x, kernel, pad, stride=1):
    """Each channel zero-padded by `pad` on every side, filtered, every `stride`-th pixel kept:
    (B, C, H, W) -> (B, C, (H + 2 pad - 4) // stride + 1, ...)."""
    return F.conv2d(x, _depthwise(kernel, x), stride=stride, padding=pad, groups=x.shape[1])


def fir_upsample2d(x, kernel):
    """x2 upsampling (upfirdn2d.upsample2d): zeros inserted after each pixel, padding 2 before and
    1 after, the kernel times 4. As one transposed conv: stride 2 inserts the zeros and gives the
    full convolution (2H + 2), padding=1 crops one pixel each side. (B, C, H, W) -> (B, C, 2H, 2W)."""
    return F.conv_transpose2d(x, _depthwise(kernel, x, 4.0), stride=2, padding=1, groups=x.shape[1])


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (Karras et al. 2018, ProGAN Sec. 4.1): the weight
    is stored N(0, 1) / lr_mult and scaled at run time by lr_mult / sqrt(in_f), the bias stored as
    bias_init and scaled by lr_mult, so Adam's step is lr_mult times smaller in effective units.
    Official code: stylegan2-ada-pytorch training/networks.py (FullyConnectedLayer)."""

    def __init__(self, in_f, out_f, bias=True, lr_mult=1.0, bias_init=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_f, in_f) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_f,), float(bias_init))) if bias else None
        self.weight_gain, self.lr_mult = lr_mult / math.sqrt(in_f), lr_mult

    def forward(self, x):  # (B, in_f) -> (B, out_f)
        bias = self.bias * self.lr_mult if self.bias is not None else None
        return F.linear(x, self.weight * self.weight_gain, bias)


class EqualConv2d(nn.Module):
    """Conv (stride 1, 'same' padding) with equalised learning rate: weight N(0, 1) scaled by
    1 / sqrt(c_in * k * k) at run time, bias 0. down=True halves the resolution as the official
    layer does: the FIR low-pass (padding k // 2 + 1 each side), then the conv with stride 2 and
    no padding; a 1x1 conv instead keeps every second pixel of the filtered input (stride 2 in
    the filter), the same numbers with a quarter of the conv's work. Official code:
    training/networks.py (Conv2dLayer), torch_utils/ops/upfirdn2d.py (downsample2d)."""

    def __init__(self, c_in, c_out, k, bias=True, down=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.weight_gain, self.down = 1.0 / math.sqrt(c_in * k * k), down
        if down:
            self.register_buffer("resample_filter", _fir_kernel(), persistent=False)

    def forward(self, x):  # (B, c_in, H, W) -> (B, c_out, H, W), or H/2, W/2 with down
        w, k = self.weight * self.weight_gain, self.weight.shape[-1]
        if not self.down:
            return F.conv2d(x, w, self.bias, padding=k // 2)
        if k == 1:  # (B, c_in, H/2, W/2), then the 1x1 conv
            return F.conv2d(fir_filter2d(x, self.resample_filter, 1, stride=2), w, self.bias)
        x = fir_filter2d(x, self.resample_filter, k // 2 + 1)  # (B, c_in, H + 2 k//2 - 1, ...)
        return F.conv2d(x, w, self.bias, stride=2)


class MappingNetwork(nn.Module):
    """z -> w: normalise z by its second moment (eps 1e-8), then n_layers EqualLinear (all width
    w_dim, lr_mult 0.01: StyleGAN 1's 100x lower mapping learning rate), each followed by the
    sqrt(2)-gain leaky ReLU, the last one included. Keeps `w_avg`, a moving
    average of w (beta 0.995) updated in training mode, the centre of the truncation trick.
    Official code: training/networks.py (MappingNetwork, normalize_2nd_moment, w_avg_beta)."""

    def __init__(self, z_dim, w_dim, n_layers=8, lr_mult=0.01):
        super().__init__()
        dims = [z_dim] + [w_dim] * n_layers
        self.layers = nn.ModuleList([EqualLinear(a, b, lr_mult=lr_mult) for a, b in zip(dims[:-1], dims[1:])])
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.w_avg_beta = 0.995

    def forward(self, z, update_w_avg=True):  # (B, z_dim) -> (B, w_dim)
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for layer in self.layers:
            x = _lrelu(layer(x))
        if self.training and update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(torch.lerp(x.detach().float().mean(0), self.w_avg, self.w_avg_beta))
        return x


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated conv (paper Sec. 2.2, Eq. 1 and 3), no bias. Per sample b:
        s = affine(w)                               style, (B, c_in); affine bias starts at 1
        w'[b, o, i, :, :] = s[b, i] * W[o, i, :, :] modulation (W = stored weight / sqrt(c_in k k))
        w''[b, o] = w'[b, o] / sqrt(sum_{i,k,k} w'[b, o]^2 + 1e-8)   demodulation (if demodulate)
    then one grouped conv (groups = B) applies each sample's own weights. The 1/sqrt(fan_in)
    factor cancels under demodulation; ToRGB (demodulate=False) needs it, as the official code
    puts it on the styles there. up=True (k = 3): as the official layer, a transposed conv with
    stride 2 (the correlation of the zero-inserted input with our kernel, (2H + 1, 2W + 1)), then
    the FIR low-pass times 4 with padding 1 -> (2H, 2W). Our weights are correlation kernels, so
    an official up-conv weight loads flipped in H and W. Official code: training/networks.py
    (modulated_conv2d, SynthesisLayer, ToRGBLayer); the paddings are conv2d_resample's (checked
    number for number by tests/test_stylegan2_official.py)."""

    def __init__(self, c_in, c_out, k, w_dim, demodulate=True, up=False):
        super().__init__()
        self.affine = EqualLinear(w_dim, c_in, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.weight_gain, self.demodulate, self.up = 1.0 / math.sqrt(c_in * k * k), demodulate, up
        if up:
            if k != 3:
                raise ValueError("ModulatedConv2d(up=True) has the official padding for k = 3 only")
            self.register_buffer("resample_filter", _fir_kernel(), persistent=False)

    def forward(self, x, w):  # x (B, c_in, H, W), w (B, w_dim) -> (B, c_out, H', W')
        B, c_in, _, _ = x.shape
        s = self.affine(w)  # (B, c_in)
        weight = self.weight[None] * self.weight_gain * s[:, None, :, None, None]  # (B, c_out, c_in, k, k)
        if self.demodulate:
            weight = weight * (weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
        k = weight.shape[-1]
        x = x.reshape(1, B * c_in, *x.shape[2:])
        if self.up:
            # conv_transpose2d convolves (flipped kernel); its weight is (B * c_in, c_out, k, k)
            wt = weight.flip([3, 4]).transpose(1, 2).reshape(B * c_in, -1, k, k)
            out = F.conv_transpose2d(x, wt, stride=2, groups=B)  # (1, B * c_out, 2H + 1, 2W + 1)
            out = fir_filter2d(out, self.resample_filter * 4.0, 1)  # (1, B * c_out, 2H, 2W)
        else:
            out = F.conv2d(x, weight.reshape(-1, c_in, k, k), padding=k // 2, groups=B)  # (1, B * c_out, H, W)
        return out.reshape(B, -1, *out.shape[2:])


class NoiseInjection(nn.Module):
    """Adds per-pixel noise, the same for all channels, times a learned scalar strength that
    starts at 0 (paper Fig. 2c). noise_mode: "random" (fresh N(0, 1) per sample), "const" (a fixed
    N(0, 1) map drawn at construction, a buffer) or "none". Official code: training/networks.py
    (SynthesisLayer: noise_const, noise_strength)."""

    def __init__(self, res):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(res, res))

    def forward(self, x, noise_mode="random"):  # (B, C, H, W) -> same
        if noise_mode == "random":
            return x + torch.randn_like(x[:, :1]) * self.strength
        if noise_mode == "const":
            return x + self.noise_const * self.strength
        if noise_mode == "none":
            return x
        raise ValueError(f"unknown noise_mode {noise_mode!r}")


class StyledConv(nn.Module):
    """One synthesis layer: modulated 3x3 conv (optionally upsampling) -> noise -> bias -> leaky
    ReLU with gain sqrt(2). Official code: training/networks.py (SynthesisLayer)."""

    def __init__(self, c_in, c_out, w_dim, res, up=False):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, c_out, 3, w_dim, up=up)
        self.noise = NoiseInjection(res)
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x, w, noise_mode="random"):  # (B, c_in, r or r/2, .) -> (B, c_out, r, r)
        return _lrelu(self.noise(self.conv(x, w), noise_mode), self.bias)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels, no demodulation, plus bias, linear (paper Fig. 7b)."""

    def __init__(self, c_in, channels, w_dim):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, w):  # (B, c_in, r, r) -> (B, channels, r, r)
        return self.conv(x, w) + self.bias.view(1, -1, 1, 1)


class StyleGAN2Generator(nn.Module):
    """StyleGAN2 G, 'skip' architecture (paper Fig. 7b, config F). A learned constant (c_4, 4, 4)
    (N(0, 1) init) goes through one styled conv at 4x4, then per resolution r = 8 .. img_size two
    styled convs (the first upsamples). Every resolution has a ToRGB; the image is the sum of the
    ToRGB outputs, each earlier one upsampled x2 per step (fir_upsample2d, official). Channels at r:
    min(channel_base // r, channel_max). num_ws = 2 log2(img_size) - 2 w vectors: ws[k] drives
    styled conv k and the ToRGB after conv k reads ws[k + 1] (the official slicing: a block reads
    its convs' ws and the next one). No tanh: StyleGAN2 has none. `y` is accepted and ignored.
    Official code: training/networks.py (SynthesisBlock, SynthesisNetwork, Generator)."""

    def __init__(self, z_dim, img_size, channels=3, w_dim=None, channel_base=32768, channel_max=512,
                 n_mapping=8, style_mixing=0.0):
        super().__init__()
        if img_size < 4 or img_size & (img_size - 1):
            raise UsageError(f"StyleGAN2 needs img_size a power of two >= 4; got {img_size}")
        w_dim = w_dim or z_dim
        self.z_dim, self.w_dim, self.img_size, self.style_mixing = z_dim, w_dim, img_size, style_mixing
        res = [2 ** i for i in range(2, int(math.log2(img_size)) + 1)]  # 4, 8, ..., img_size
        ch = {r: min(channel_base // r, channel_max) for r in res}
        self.mapping_net = MappingNetwork(z_dim, w_dim, n_mapping)
        self.const = nn.Parameter(torch.randn(ch[4], 4, 4))
        self.convs = nn.ModuleList([StyledConv(ch[4], ch[4], w_dim, 4)])
        for r in res[1:]:
            self.convs.extend([StyledConv(ch[r // 2], ch[r], w_dim, r, up=True), StyledConv(ch[r], ch[r], w_dim, r)])
        self.to_rgbs = nn.ModuleList([ToRGB(ch[r], channels, w_dim) for r in res])
        self.num_ws = len(self.convs) + 1
        self.register_buffer("resample_filter", _fir_kernel(), persistent=False)

    def mapping(self, z, truncation=1.0):
        """z (B, z_dim) -> ws (B, num_ws, w_dim). In training mode: updates w_avg and, with
        probability style_mixing, replaces ws[:, cutoff:] by those of a second z, one coin flip
        and one cutoff ~ U{1, .., num_ws - 1} for the whole batch (official code: training/loss.py,
        StyleGAN2Loss.run_G; the second z does not update w_avg). truncation psi: w_avg + psi (w - w_avg)."""
        ws = self.mapping_net(z)[:, None].repeat(1, self.num_ws, 1)  # (B, num_ws, w_dim)
        if self.training and self.style_mixing > 0 and torch.rand([]).item() < self.style_mixing:
            cutoff = int(torch.randint(1, self.num_ws, []))
            ws2 = self.mapping_net(torch.randn_like(z), update_w_avg=False)
            ws = torch.cat([ws[:, :cutoff], ws2[:, None].expand(-1, self.num_ws - cutoff, -1)], dim=1)
        if truncation != 1:
            ws = torch.lerp(self.mapping_net.w_avg.to(ws.dtype), ws, truncation)
        return ws

    def synthesis(self, ws, noise_mode="random"):  # (B, num_ws, w_dim) -> (B, channels, S, S)
        x = self.const[None].repeat(ws.shape[0], 1, 1, 1)  # (B, c_4, 4, 4)
        x = self.convs[0](x, ws[:, 0], noise_mode)
        img = self.to_rgbs[0](x, ws[:, 1])  # (B, channels, 4, 4)
        for i, to_rgb in enumerate(self.to_rgbs[1:]):
            x = self.convs[2 * i + 1](x, ws[:, 2 * i + 1], noise_mode)  # (B, c_r, r, r), upsampled
            x = self.convs[2 * i + 2](x, ws[:, 2 * i + 2], noise_mode)
            img = fir_upsample2d(img, self.resample_filter)  # official: upfirdn2d.upsample2d
            img = img + to_rgb(x, ws[:, 2 * i + 3])  # (B, channels, r, r)
        return img

    def forward(self, z, y=None, return_ws=False, truncation=1.0, noise_mode="random"):
        ws = self.mapping(z, truncation)
        img = self.synthesis(ws, noise_mode)  # (B, channels, img_size, img_size)
        return (img, ws) if return_ws else img


class MinibatchStd(nn.Module):
    """Minibatch standard deviation (Karras et al. 2018, ProGAN Sec. 3), official StyleGAN2
    semantics: groups of G = min(group_size, B) samples, sample b in group b mod (B / G) (the
    batch is split as (G, B / G), so a group is strided, not contiguous); channels split into
    n_channels groups; std over the group (biased, eps 1e-8), averaged over channels and pixels;
    each sample gets its group's n_channels values as extra constant channels. B must be a
    multiple of G. Official code: training/networks.py (MinibatchStdLayer)."""

    def __init__(self, group_size, n_channels=1):
        super().__init__()
        self.group_size, self.n_channels = group_size, n_channels
        self.parts = 1      # > 1: the batch is that many independent sub-batches (minibatch_parts)

    def forward(self, x):  # (B, C, H, W) -> (B, C + n_channels, H, W)
        if self.parts > 1:
            return torch.cat([self._append_std(c) for c in x.chunk(self.parts)])
        return self._append_std(x)

    def _append_std(self, x):
        B, C, H, W = x.shape
        G, n = min(self.group_size, B), self.n_channels
        if B % G:
            raise UsageError(f"the minibatch-std group size {G} must divide the (per-GPU) batch {B}")
        y = x.reshape(G, -1, n, C // n, H, W)  # (G, B/G, n, C/n, H, W)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # (B/G, n, C/n, H, W)
        y = y.mean(dim=(2, 3, 4))  # (B/G, n)
        y = y[:, :, None, None].repeat(G, 1, H, W)  # (B, n, H, W)
        return torch.cat([x, y], dim=1)


@contextlib.contextmanager
def minibatch_parts(model, parts):
    """Inside the block, every MinibatchStd of `model` splits its batch into `parts` equal
    sub-batches and groups samples within each: one D forward over a concatenation of real,
    generated, mixed, ... images then gives each part the statistics a separate call would."""
    layers = [m for m in unwrap(model).modules() if isinstance(m, MinibatchStd)]
    for m in layers:
        m.parts = parts
    try:
        yield
    finally:
        for m in layers:
            m.parts = 1


class StyleGAN2DBlock(nn.Module):
    """Residual D block (paper Fig. 7c): conv3x3 - lrelu - conv3x3 (down) - lrelu, plus a bias-free
    1x1 skip (down), the sum times 1/sqrt(2). Official code: training/networks.py (DiscriminatorBlock,
    architecture 'resnet', gain sqrt(0.5) on both paths)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv0 = EqualConv2d(c_in, c_in, 3)
        self.conv1 = EqualConv2d(c_in, c_out, 3, down=True)
        self.skip = EqualConv2d(c_in, c_out, 1, bias=False, down=True)

    def forward(self, x):  # (B, c_in, r, r) -> (B, c_out, r/2, r/2)
        h = _lrelu(self.conv1(_lrelu(self.conv0(x))))
        return (h + self.skip(x)) / _SQRT2


class StyleGAN2Discriminator(nn.Module):
    """StyleGAN2 D, 'resnet' architecture (paper Fig. 7c, config F): FromRGB (1x1 conv + lrelu) at
    full resolution, one StyleGAN2DBlock per resolution img_size .. 8 (channels min(channel_base // r,
    channel_max) at r, halving to r / 2), then the 4x4 epilogue: MinibatchStd -> conv3x3 + lrelu
    -> flatten -> EqualLinear(16 c_4 -> c_4) + lrelu -> EqualLinear(c_4 -> out_dim).
    forward(x, y=None) -> (B, out_dim); y is accepted and ignored. Official code: training/networks.py
    (Discriminator, DiscriminatorEpilogue)."""

    def __init__(self, img_size, channels=3, out_dim=1, channel_base=32768, channel_max=512,
                 mbstd_group=4, mbstd_channels=1):
        super().__init__()
        if img_size < 4 or img_size & (img_size - 1):
            raise UsageError(f"StyleGAN2 needs img_size a power of two >= 4; got {img_size}")
        res = [2 ** i for i in range(int(math.log2(img_size)), 1, -1)]  # img_size, ..., 4
        ch = {r: min(channel_base // r, channel_max) for r in res}
        self.from_rgb = EqualConv2d(channels, ch[img_size], 1)
        self.blocks = nn.ModuleList([StyleGAN2DBlock(ch[r], ch[r // 2]) for r in res[:-1]])
        self.mbstd = MinibatchStd(mbstd_group, mbstd_channels)
        self.conv = EqualConv2d(ch[4] + mbstd_channels, ch[4], 3)
        self.fc = EqualLinear(ch[4] * 16, ch[4])
        self.out = EqualLinear(ch[4], out_dim)

    def forward(self, x, y=None):  # (B, channels, S, S) -> (B, out_dim)
        h = _lrelu(self.from_rgb(x))  # (B, c_S, S, S)
        for block in self.blocks:
            h = block(h)  # (B, c_{r/2}, r/2, r/2)
        h = _lrelu(self.conv(self.mbstd(h)))  # (B, c_4, 4, 4)
        return self.out(_lrelu(self.fc(h.flatten(1))))


def r1_penalty(scores, x_real):
    """R1 (Mescheder et al. 2018): mean over the batch of ||d sum(scores) / d x_real||^2, the squared
    gradient norm summed over C, H, W. x_real must require grad and `scores` come from it;
    create_graph=True so the penalty can be backpropagated into D. The caller multiplies by gamma / 2
    (and by the lazy interval, paper Sec. 3.1). Official code: training/loss.py (Dr1), including
    its `scores * 0` term: every parameter of D is then in the graph (a bias that the gradient
    w.r.t. x does not see would otherwise leave DDP waiting for its gradient)."""
    (grad,) = torch.autograd.grad(scores.sum(), x_real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean() + 0 * scores.sum()


def path_length_penalty(G, z, pl_mean, decay=0.01, noise=None):
    """Path length regulariser (paper Sec. 3.2, Eq. 4), as the official code computes it:
        ws = G.mapping(z), img = G.synthesis(ws)   (style mixing and noise as in training)
        y ~ N(0, I) / sqrt(H W)                     (`noise` overrides the draw, for tests)
        g = d sum(img * y) / d ws                   (B, num_ws, w_dim), create_graph=True
        lengths = sqrt(mean over num_ws of sum over w_dim of g^2)     (B,)
        a = lerp(pl_mean, mean(lengths), decay);  pl_mean <- a (in place, detached)
        penalty = mean((lengths - a)^2)             (a not detached, as the official code)
    pl_mean is a 0-dim float tensor kept by the caller. Returns (penalty, lengths.mean().detach());
    the caller multiplies by pl_weight and the lazy interval and uses batch / pl_batch_shrink
    samples (STYLEGAN2_CONFIGS). G may be DDP-wrapped: one forward(z, return_ws=True), so the
    gradients of the penalty are averaged like any other. Official code: training/loss.py (Gpl)."""
    img, ws = G(z, return_ws=True)  # (B, C, H, W), (B, num_ws, w_dim)
    if noise is None:
        noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (g,) = torch.autograd.grad((img * noise).sum(), ws, create_graph=True)  # (B, num_ws, w_dim)
    lengths = g.square().sum(2).mean(1).sqrt()  # (B,)
    avg = torch.lerp(pl_mean, lengths.mean().to(pl_mean.dtype), decay)
    with torch.no_grad():
        pl_mean.copy_(avg.detach())
    # Official code: `gen_img[:, 0, 0, 0] * 0` puts every parameter of G in the graph (DDP)
    return (lengths - avg).square().mean() + 0 * img[:, 0, 0, 0].sum(), lengths.mean().detach()


# The official training configurations (NVlabs/stylegan2-ada-pytorch, train.py: cfg_specs and the
# lines after it; loss defaults from training/loss.py StyleGAN2Loss; lazy intervals from
# training/training_loop.py). 'stylegan2' = StyleGAN2 config F, FFHQ 1024; 'paper256' = the ADA
# paper's FFHQ / LSUN Cat 256 setup. Notes for the training loop (same files):
#   * channel_base = fmaps * 32768, channel_max 512, z_dim = w_dim = 512;
#   * lazy regularisation: the Adam of each net uses lr * c and betas ** c, c = every / (every + 1),
#     and the regulariser's loss is multiplied by `every` (training_loop.py);
#   * G EMA: beta = 0.5 ** (batch / (ema_kimg * 1000)), no ramp-up in these two configs;
#   * path length on batch // pl_batch_shrink samples; style mixing also in the D step's fakes;
#   * every ada-pytorch config (paper256 too) runs its 4 highest resolutions in fp16 with conv_clamp
#     256 (train.py; its comment on 'stylegan2': "Uses mixed-precision, unlike the original
#     StyleGAN2"); we use neither, as the original StyleGAN2.
_SG2_COMMON = dict(z_dim=512, w_dim=512, channel_max=512, n_mapping=8, betas=(0.0, 0.99), eps=1e-8,
                   d_reg_every=16, g_reg_every=4, pl_weight=2.0, pl_batch_shrink=2, pl_decay=0.01,
                   style_mixing=0.9, kimg=25000)
STYLEGAN2_CONFIGS = {
    "stylegan2": dict(_SG2_COMMON, img_size=1024, channel_base=32768, mbstd_group=4, batch=32, lr=0.002,
                      r1_gamma=10.0, ema_kimg=10),
    "paper256": dict(_SG2_COMMON, img_size=256, channel_base=16384, mbstd_group=8, batch=64, lr=0.0025,
                     r1_gamma=1.0, ema_kimg=20),
    "paper512": dict(_SG2_COMMON, img_size=512, channel_base=32768, mbstd_group=8, batch=64, lr=0.0025,
                     r1_gamma=0.5, ema_kimg=20),
}


# ------------------------------------------------------------------------------------------------
# EMA and small helpers
# ------------------------------------------------------------------------------------------------


def unwrap(model):
    """The plain module inside DistributedDataParallel / DataParallel (`.module`) and
    torch.compile (`._orig_mod`), in any nesting. Checked by type, so a user module that happens
    to have a child called `module` is left alone."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile's wrapper (not imported: torch._dynamo is slow)
        else:
            return model


def count_params(model, trainable_only=False):
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def batch_norm_from_batch(model):
    """Inside the block, every BatchNorm of `model` normalises with the statistics of the batch it
    sees (train-mode BN) while its running statistics and counters stay as they were: how
    BigGAN-PyTorch samples its EMA generator by default."""
    bns = [m for m in unwrap(model).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, {k: b.clone() for k, b in m.named_buffers()}) for m in bns]
    for m in bns:
        m.train()
    try:
        yield
    finally:
        for m, (mode, buffers) in zip(bns, saved):
            m.train(mode)
            for k, b in m.named_buffers():
                b.copy_(buffers[k])


class EMA:
    """Exponential moving average of a model's weights (Yazici et al. 2019; BigGAN's G_ema).

    `shadow` is a deep copy in eval mode with no gradients. update(model):
        shadow_param <- decay * shadow_param + (1 - decay) * param   (torch.lerp)
        shadow_buffer <- buffer                                     (BN running stats, SN vectors)
    Buffers are copied, not averaged: averaging BN statistics of different weights means nothing.
    (Official code, BigGAN-PyTorch utils.py ema: averages every state-dict entry, buffers included.)
    `update(model, decay=0.0)` copies the weights outright (BigGAN's / PGMGAN's `ema_start`).
    state_dict() is the shadow's own state dict (tensors only: torch.load(weights_only=True)
    works, and it loads into a freshly built network for sampling).
    """

    def __init__(self, model, decay=0.999):
        self.decay = decay
        self.shadow = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, decay=None):
        decay = self.decay if decay is None else decay
        src = unwrap(model)
        params = dict(src.named_parameters())
        for name, p in self.shadow.named_parameters():
            p.lerp_(params[name].detach().to(p.dtype), 1.0 - decay)
        buffers = dict(src.named_buffers())
        for name, b in self.shadow.named_buffers():
            b.copy_(buffers[name])

    def step(self, model, step, start=0):
        """The per-step update of a training loop (BigGAN / PGMGAN official): a plain copy of the
        weights until G step `start`, the moving average after it."""
        self.update(model, decay=0.0 if step <= start else None)

    def __call__(self, *args, **kwargs):
        return self.shadow(*args, **kwargs)

    def to(self, *args, **kwargs):
        self.shadow.to(*args, **kwargs)
        return self

    def state_dict(self):
        return self.shadow.state_dict()

    def load_state_dict(self, state_dict):
        return self.shadow.load_state_dict(state_dict)


# ==================================================================================================
# 7. Metrics
# ==================================================================================================

# The metrics every paper reports, in one place so that the three scripts and evaluate.py compute
# them the same way. METHODS.md ("Metrics") fixes each definition; the sub-sections are:
#
#   7a. Networks            the FID Inception (pytorch-fid's keys) and VGG-16 (precision/recall);
#                           weights lookup, download and full SHA-256 check
#   7b. Feature extraction  images quantised to uint8 as a PNG stores them -> features; streaming stats
#   7c. Scores              FID, IS, Mode Score, KID, precision/recall, PRD, I-Variance
#   7d. Real images         one path (build_dataset's pixels), statistics files, a keyed cache
#   7e. One call            image_metrics(...) for the method scripts and evaluate.py
#   7f. Mode coverage       2-D ring/grid; stacked (Fashion-)MNIST with a calibrated classifier
#
# Everything here is inference: no gradients, float64 wherever a score is accumulated.

import hashlib    # (json, math, os, sys, time, numpy, nn and F are imported above)


@contextlib.contextmanager
def metric_precision():
    """Full float32 for every metric: TF32 matmuls / convolutions and cuDNN's autotuner off
    (setup_runtime turns them on for training), so a run's metrics.json and evaluate.py on its
    checkpoint compute alike. Restored on exit."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = flags

# --- 7a. The FID Inception network ---------------------------------------------------------------
# FID is only comparable across papers when computed with *the* network of the TensorFlow
# reference (TTUR, Heusel et al. 2017): the 2015-12-05 Inception graph. pytorch-fid ported its
# weights to a torchvision-style Inception3 with 1008 classes and four patched blocks; that file
# (FID_INCEPTION_WEIGHTS below) is checked against its full SHA-256, which pytorch-fid never does.
INCEPTION_SIZE = 299          # input resolution of the network
INCEPTION_CLASSES = 1008      # the TF graph's 1008 outputs (1000 ImageNet classes + 8 unused)


def _tf_avg_pool(x):
    # TensorFlow's 3x3/stride-1 "SAME" average pool divides by the number of *real* pixels under
    # the window; PyTorch's default counts the zero padding too. pytorch-fid patch #1.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; the parameter names of torchvision's
    BasicConv2d (`conv.weight`, `bn.*`), so the state dict matches pytorch-fid's file key for key."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _InceptionA(nn.Module):
    # Mixed_5b/5c/5d (35x35). Patched: TF average pool.
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    # Mixed_6a: 35x35 -> 17x17 (stride-2 convs and a max pool; nothing patched).
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):
    # Mixed_6b..6e (17x17, factorised 7x7 convs). Patched: TF average pool.
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                          self.branch_pool(_tf_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    # Mixed_7a: 17x17 -> 8x8 (nothing patched).
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    # Mixed_7b (TF average pool, patch #1) and Mixed_7c (patch #2: the TF graph max-pools here,
    # where the Inception-v3 paper and torchvision average; pytorch-fid keeps the graph's choice).
    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else _tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                          self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception network: pytorch-fid's architecture with its state-dict keys (those of
    torchvision's Inception3 with num_classes=1008, no aux head), so the standard file
    `pt_inception-2015-12-05-6726825d.pth` loads as is (`load_state_dict`, strict).

    forward(x): x (B, 3, 299, 299) in [-1, 1] -> pool3 features (B, 2048).
    logits(pool3) = pool3 @ fc.weight^T (no bias; 1008 classes), as the TF reference and
    torch-fidelity compute the IS logits. Use `load_fid_inception` rather than this class.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)       # 299 -> 149
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)                # 147
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)     # 147, then max pool -> 73
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)               # 71, then max pool -> 35
        self.Mixed_5b = _InceptionA(192, pool_features=32)     # 35x35x256
        self.Mixed_5c = _InceptionA(256, pool_features=64)     # 35x35x288
        self.Mixed_5d = _InceptionA(288, pool_features=64)     # 35x35x288
        self.Mixed_6a = _InceptionB(288)                       # 17x17x768
        self.Mixed_6b = _InceptionC(768, c7=128)
        self.Mixed_6c = _InceptionC(768, c7=160)
        self.Mixed_6d = _InceptionC(768, c7=160)
        self.Mixed_6e = _InceptionC(768, c7=192)               # 17x17x768
        self.Mixed_7a = _InceptionD(768)                       # 8x8x1280
        self.Mixed_7b = _InceptionE(1280)                      # 8x8x2048
        self.Mixed_7c = _InceptionE(2048, max_pool=True)       # 8x8x2048
        self.fc = nn.Linear(2048, INCEPTION_CLASSES)           # only its weight is used (logits)
        self.weights_sha256 = None

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)                # (B, 2048) pool3

    def logits(self, pool3):
        return pool3 @ self.fc.weight.t()                                 # (B, 1008)

    kind = "inception"

    def embed(self, images):
        """uint8 images (B, 1 or 3, H, W) -> (pool3 (B, 2048), logits (B, 1008)), the image
        prepared as pytorch-fid prepares a PNG (inception_input)."""
        x = inception_input(images)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        pool3 = self(x).float()
        return pool3, self.logits(pool3)


@dataclass(frozen=True)
class WeightsFile:
    """A pretrained network's weights: where they are published and the file's full SHA-256."""

    what: str        # e.g. "FID Inception"
    url: str
    sha256: str      # of the published file (its name carries the first 8 hex digits)
    flag: str        # the command-line flag that passes a local copy

    @property
    def file(self):
        return self.url.rsplit("/", 1)[1]


# pytorch-fid's port of the TF graph (95,628,359 bytes); torch-fidelity ships the same file.
FID_INCEPTION_WEIGHTS = WeightsFile(
    "FID Inception", "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", "--inception-weights")
# torchvision's ImageNet VGG-16 (IMAGENET1K_V1): torch-fidelity's precision/recall network.
VGG16_WEIGHTS = WeightsFile(
    "VGG-16", "https://download.pytorch.org/models/vgg16-397923af.pth",
    "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0", "--vgg-weights")

_SHA256_CACHE = {}


def file_sha256(path):
    """SHA-256 hex digest of a file (memoised by path, size and mtime: weights are 92-528 MB)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def weights_path(spec, weights=None, download=True):
    """(path, sha256) of the weights `spec` describes.

    Order: `weights` as given (one warning line when it is not the published file), else
    torch.hub's cache (checkpoints/<file>, where pytorch-fid and torchvision download to), else a
    download into that cache, whose full SHA-256 is checked before the file is moved in place.
    """
    if weights is not None:
        if not os.path.isfile(weights):
            raise UsageError(f"{spec.flag} {weights}: no such file")
        sha = file_sha256(weights)
        if sha != spec.sha256:
            print(f"warning: {weights} is not the published {spec.what} file {spec.file} (SHA-256 "
                  f"{sha[:12]}..., expected {spec.sha256[:12]}...): custom or test weights, scores "
                  "are not comparable with published ones", file=sys.stderr, flush=True)
        return weights, sha
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", spec.file)
    hint = f"download {spec.url} and put it at {cached}, or pass {spec.flag} PATH"
    if os.path.isfile(cached):
        sha = file_sha256(cached)
        if sha != spec.sha256:
            raise UsageError(f"{cached} has SHA-256 {sha[:12]}..., not {spec.sha256[:12]}...: "
                             f"delete it (it will be downloaded again) or pass it with {spec.flag}")
        return cached, sha
    if not download:
        raise UsageError(f"no {spec.what} weights: {hint}")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    part = cached + ".part"
    print(f"downloading the {spec.what} weights to {cached}", file=sys.stderr, flush=True)
    try:
        torch.hub.download_url_to_file(spec.url, part, progress=False)
    except Exception as err:                       # URLError, timeouts, HTTP errors, ...
        if os.path.exists(part):
            os.remove(part)
        reason = getattr(err, "reason", None) or type(err).__name__
        raise UsageError(f"cannot download the {spec.what} weights ({reason}): {hint}") from None
    sha = file_sha256(part)
    if sha != spec.sha256:
        os.remove(part)
        raise UsageError(f"the downloaded {spec.what} weights have SHA-256 {sha[:12]}..., not "
                         f"{spec.sha256[:12]}...: deleted the file; {hint}")
    os.replace(part, cached)
    return cached, sha


def _load_weights(model, path, spec):
    """Load the state dict file `path` into `model` (strict), each kind of mismatch one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"{path} is not a PyTorch weights file ({type(err).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} is not an {spec.what} state dict (not a dict of tensors)")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # `num_batches_tracked` is optional: files saved by old PyTorch versions lack it.
    need = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(need - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in need & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        what = "missing" if missing else "unexpected" if extra else "wrong shape for"
        raise UsageError(f"{path} is not an {spec.what} state dict ({what} key {first!r}; "
                         f"{len(missing)} missing, {len(extra)} unexpected, {len(wrong)} mis-shaped)")
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state)


def _ready(model, sha, device):
    model.weights_sha256 = sha
    model.eval().requires_grad_(False)
    device = torch.device(device)
    model = model.to(device)
    if device.type == "cpu":
        # oneDNN's convolutions run faster on NHWC tensors (no reorders between layers).
        model = model.to(memory_format=torch.channels_last)
    return model


def load_fid_inception(weights=None, device="cpu"):
    """The FID Inception network, weights loaded (see weights_path), in eval mode on `device`.
    (Folding BN into the convs and merging the 1x1 head convs measured no faster on this CPU,
    1.5 vs 1.5 img/s, so the network stays as pytorch-fid builds it.)"""
    path, sha = weights_path(FID_INCEPTION_WEIGHTS, weights)
    model = FIDInceptionV3()
    _load_weights(model, path, FID_INCEPTION_WEIGHTS)
    return _ready(model, sha, device)


class VGG16Features(nn.Module):
    """Precision/recall features (Kynkäänniemi et al. 2019): the 4096-d output of VGG-16's second
    fully connected layer after its ReLU (torch-fidelity's `fc2_relu`, its default for PR).

    embed(uint8 images) -> (features, None). Input as torch-fidelity: pixels 0..255 as float,
    bilinear resize to 224, ImageNet mean/std (scaled to 0..255). torch-fidelity resizes with its
    TF1-compatible bilinear kernel, we with F.interpolate (align_corners=False): features move by
    resampling differences only.
    """

    kind = "vgg16"
    MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

    def __init__(self):
        import torchvision

        super().__init__()
        self.net = torchvision.models.vgg16(weights=None, init_weights=False)
        self.weights_sha256 = None

    def truncate_(self):
        # classifier = fc1, ReLU, Dropout, fc2, ReLU, Dropout, fc3: keep up to fc2 (after loading).
        self.net.classifier = self.net.classifier[:4]
        return self

    def embed(self, images):
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.MEAN, device=x.device)[None, :, None, None]
        std = torch.tensor(self.STD, device=x.device)[None, :, None, None]
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        h = self.net.avgpool(self.net.features(x)).flatten(1)
        return F.relu(self.net.classifier(h)).float(), None


def load_vgg16(weights=None, device="cpu"):
    """VGG16Features with torchvision's ImageNet weights (see weights_path), eval mode."""
    path, sha = weights_path(VGG16_WEIGHTS, weights)
    model = VGG16Features()
    _load_weights(model.net, path, VGG16_WEIGHTS)
    return _ready(model.truncate_(), sha, device)


# --- 7b. Feature extraction -----------------------------------------------------------------------
def to_uint8(images):
    """Generated images in [-1, 1] -> uint8 exactly as writing them to a PNG does
    (torchvision's save_image: x01 * 255 + 0.5, clamped, truncated), so that a score computed in
    memory equals pytorch-fid's on the saved files. uint8 input is returned as it is."""
    if images.dtype == torch.uint8:
        return images
    # NaN -> black and +-inf -> white / black, explicitly (a bare cast is undefined); callers count them.
    x = torch.nan_to_num(images.float(), nan=-1.0, posinf=1.0, neginf=-1.0)
    return ((x + 1.0) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)


def inception_input(images):
    """uint8 (B, 1 or 3, H, W) -> the network's input as pytorch-fid builds it from a PNG:
    /255 (ToTensor), grey -> RGB (PIL's convert("RGB")), bilinear resize to 299
    (align_corners=False), 2x - 1."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UsageError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


class FeatureStats:
    """Streaming statistics of one network's features, so no pass holds all images (or, for FID
    alone, all features) in memory.

    moments: mean and covariance in float64 with the pairwise update of Chan, Golub & LeVeque
    (1979), equal to np.cov(all, rowvar=False) to float64 rounding; with logits, also the mean
    class probabilities p_y (the Mode Score's real marginal). keep_features: keep float32 feature
    rows (all, or `keep_rows` chosen at random among `total`) for KID / PR / PRD.
    keep_logits: keep the logits for IS / Mode Score / I-Variance.
    """

    def __init__(self, moments=True, keep_features=False, keep_logits=False, total=None,
                 keep_rows=None, seed=0):
        self.n, self.mean, self.m2, self.prob_sum = 0, None, None, None
        self.moments, self.keep_features, self.keep_logits = moments, keep_features, keep_logits
        self.features, self.logits = [], []
        self.keep_index = None
        self.non_finite = 0            # images with a NaN / inf pixel (extract counts them)
        if keep_features and keep_rows is not None and total is not None and total > keep_rows:
            rng = np.random.default_rng(seed)
            self.keep_index = np.sort(rng.choice(total, keep_rows, replace=False))

    def add(self, features, logits=None):
        """features (B, D), logits (B, K) or None: torch tensors (any device) or numpy arrays."""
        f = features.detach().double().cpu().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
        b = len(f)
        if b == 0:
            return
        if self.moments:
            bmean = f.mean(0)
            centred = f - bmean
            bm2 = centred.T @ centred
            if self.n == 0:
                self.mean, self.m2 = bmean, bm2
            else:
                n = self.n + b
                delta = bmean - self.mean
                self.mean = self.mean + delta * (b / n)
                self.m2 = self.m2 + bm2 + np.outer(delta, delta) * (self.n * b / n)
        if logits is not None:
            from scipy.special import softmax

            lg = logits.detach().double().cpu().numpy() if torch.is_tensor(logits) else np.asarray(logits, np.float64)
            probs = softmax(lg, axis=1).sum(0)
            self.prob_sum = probs if self.prob_sum is None else self.prob_sum + probs
            if self.keep_logits:
                self.logits.append(lg.astype(np.float32))
        if self.keep_features:
            if self.keep_index is None:
                self.features.append(f.astype(np.float32))
            else:
                lo, hi = np.searchsorted(self.keep_index, [self.n, self.n + b])
                self.features.append(f[self.keep_index[lo:hi] - self.n].astype(np.float32))
        self.n += b

    def result(self):
        """{'n', and 'mu', 'sigma', 'p_y', 'features', 'logits' where computed or kept} (numpy)."""
        if self.n < 2:
            raise UsageError(f"need at least 2 images for statistics, got {self.n}")
        out = {"n": self.n}
        if self.moments:
            out.update(mu=self.mean, sigma=self.m2 / (self.n - 1))
        if self.prob_sum is not None:
            out["p_y"] = self.prob_sum / self.n
        if self.keep_features:
            out["features"] = np.concatenate(self.features)
        if self.keep_logits:
            out["logits"] = np.concatenate(self.logits)
        return out


def _prefetched(iterable):
    """Iterate in a background thread, one item ahead: image decoding or sampling overlaps the
    forward pass. Exceptions reach the consumer unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    it, end = iter(iterable), object()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(next, it, end)
        while True:
            item = fut.result()
            if item is end:
                return
            fut = pool.submit(next, it, end)
            yield item


@torch.inference_mode()
def extract(batches, nets, stats, device, total=None, progress=True, label="features", on_batch=None):
    """Feed every batch to every network: stats[name].add(*nets[name].embed(batch)).

    batches: uint8 (B, C, H, W), or float in [-1, 1], which is first quantised by to_uint8
    exactly as a PNG stores it. on_batch(uint8 batch), if given, sees every quantised batch
    (`evaluate.py ckpt --save-samples` writes them). One batch at a time: images never pile up.
    """
    device = torch.device(device)
    meter = ProgressLine(label, total or 0, "images", show=progress)
    for s in stats.values():
        s.non_finite = 0
    for batch in batches:
        if len(batch) == 0:
            continue
        if batch.dtype != torch.uint8:                  # scored as to_uint8 maps them, and counted
            bad = int((~torch.isfinite(batch.detach()).flatten(1).all(1)).sum())
            for s in stats.values():
                s.non_finite += bad
        x = to_uint8(batch.detach()).to(device)
        if on_batch is not None:
            on_batch(x.cpu())
        for name, net in nets.items():
            stats[name].add(*net.embed(x))
        meter.add(len(x))
    return stats


# --- 7c. Scores ---------------------------------------------------------------------------------
def fid_from_stats(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

        FID = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr sqrt(S1 S2).

    Tr sqrt(S1 S2) without scipy.linalg.sqrtm (a Schur decomposition in complex arithmetic):
    factor S1 = B B^T. S1 S2 = B (B^T S2) has the same non-zero eigenvalues as the symmetric
    PSD matrix M = B^T S2 B, and sqrt(S1 S2) has their square roots, so
    Tr sqrt(S1 S2) = sum_i sqrt(lambda_i(M)): one Cholesky, two matmuls and one symmetric
    eigenvalue solve, all in float64. B is the Cholesky factor when S1 is positive definite
    (the usual case with more images than dimensions); otherwise (fewer images than 2048, or
    constant features) B = V diag(sqrt(w)) from S1's eigendecomposition, which is exact for a
    singular PSD matrix too. Eigenvalues below zero are rounding noise and count as 0; they are
    what makes sqrtm return the small imaginary parts that pytorch-fid drops.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise UsageError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    if np.array_equal(s1, s2):
        # Same covariance: sqrt(S S) = S for a PSD S, so the trace terms cancel exactly.
        return float(diff @ diff)
    a = torch.from_numpy((s1 + s1.T) / 2)
    b = torch.from_numpy((s2 + s2.T) / 2)
    factor, info = torch.linalg.cholesky_ex(a)          # S1 = L L^T if positive definite
    if int(info) != 0:
        w, v = torch.linalg.eigh(a)
        factor = v * w.clamp(min=0).sqrt()               # S1 = (V sqrt(w)) (V sqrt(w))^T
    m = factor.T @ b @ factor
    lam = torch.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(lam.clamp(min=0).sqrt().sum())
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def inception_score(logits, splits=10):
    """IS (Salimans et al. 2016) = exp(E_x KL(p(y|x) || p(y))), p(y) the split's marginal;
    mean and std over `splits` splits. p(y|x) = softmax of the 1008 logits. Splits as the
    OpenAI code and torch-fidelity cut them, rows [i N / splits, (i + 1) N / splits) (no row
    dropped); in the order given (torch-fidelity shuffles first, the OpenAI code does not)."""
    from scipy.special import log_softmax

    logp = log_softmax(np.asarray(logits, np.float64), axis=1)
    n = len(logp)
    if n < splits:
        raise UsageError(f"the Inception Score needs at least {splits} samples ({splits} splits), got {n}")
    scores = []
    for i in range(splits):
        lp = logp[i * n // splits:(i + 1) * n // splits]
        p = np.exp(lp)
        log_py = np.log(p.mean(0) + 1e-300)
        scores.append(np.exp((p * (lp - log_py)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def mode_score(logits, p_real):
    """Mode Score (Che et al. 2017, "Mode Regularized GANs"):
    exp(E_x KL(p(y|x) || p_g(y)) - KL(p_g(y) || p_real(y))), p_g the generated marginal,
    p_real the real images' marginal class distribution; over all samples (no splits)."""
    from scipy.special import log_softmax

    logp = log_softmax(np.asarray(logits, np.float64), axis=1)
    p = np.exp(logp)
    pg = p.mean(0)
    log_pg = np.log(pg + 1e-300)
    pr = np.asarray(p_real, np.float64)
    kl_x = (p * (logp - log_pg)).sum(1).mean()
    kl_marg = (pg * (log_pg - np.log(pr + 1e-300))).sum()
    return float(np.exp(kl_x - kl_marg))


def kid(feat_fake, feat_real, n_subsets=100, subset_size=1000, seed=0, device="cpu"):
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with the polynomial
    kernel k(x, y) = (x.y / d + 1)^3, over `n_subsets` random subsets of `subset_size` of each
    set; mean and std over subsets (torch-fidelity's defaults and its unbiased estimator). Fewer
    samples than `subset_size` is an error, as in torch-fidelity."""
    a = torch.as_tensor(np.asarray(feat_fake), dtype=torch.float64, device=device)
    b = torch.as_tensor(np.asarray(feat_real), dtype=torch.float64, device=device)
    m = subset_size
    if min(len(a), len(b)) < m or m < 2:
        raise UsageError(f"KID with subsets of {m} needs at least {m} generated and {m} real "
                         f"samples, got {len(a)} and {len(b)} (lower --kid-subset-size)")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_subsets):
        x = a[torch.as_tensor(rng.choice(len(a), m, replace=False), device=device)]
        y = b[torch.as_tensor(rng.choice(len(b), m, replace=False), device=device)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))      # noqa: E731
        vals.append(float(off(kxx) + off(kyy) - 2 * kxy.mean()))
    return float(np.mean(vals)), float(np.std(vals))


def _kth_radius(x, k, chunk=1024):
    # Distance of each row to its k-th nearest *other* row (the row itself is the 1st, at 0).
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _inside_any(q, ref, radii, chunk=1024):
    # Fraction of rows of q inside at least one ball (ref_j, radii_j).
    hits = 0
    for i in range(0, len(q), chunk):
        hits += int((torch.cdist(q[i:i + chunk], ref) <= radii[None]).any(1).sum())
    return hits / len(q)


def precision_recall(feat_fake, feat_real, k=3, device="cpu", seed=0):
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k = 3: the real manifold is
    the union of balls around each real feature reaching its k-th nearest real neighbour;
    precision = fraction of generated samples inside it; recall = fraction of real samples
    inside the generated manifold. Both sets are cut to the smaller size (random subset), as the
    paper uses equal sizes. The reference features are VGG-16's (load_vgg16)."""
    fake, real = _balanced(feat_fake, feat_real, seed)
    if len(fake) <= k:
        raise UsageError(f"precision/recall with k={k} needs more than {k} samples per set")
    f = torch.as_tensor(fake, dtype=torch.float32, device=device)
    r = torch.as_tensor(real, dtype=torch.float32, device=device)
    precision = _inside_any(f, r, _kth_radius(r, k))
    recall = _inside_any(r, f, _kth_radius(f, k))
    return precision, recall


def _balanced(a, b, seed=0):
    a, b = np.asarray(a), np.asarray(b)
    n = min(len(a), len(b))
    rng = np.random.default_rng(seed)
    if len(a) > n:
        a = a[np.sort(rng.choice(len(a), n, replace=False))]
    if len(b) > n:
        b = b[np.sort(rng.choice(len(b), n, replace=False))]
    return a, b


def prd_curve(eval_hist, ref_hist, num_angles=1001, epsilon=1e-10):
    """PRD curve of two discrete distributions (Sajjadi et al. 2018, Thm. 2): for slopes
    lambda = tan(angle) on an equiangular grid of (0, pi/2), precision alpha(lambda) =
    sum_w min(lambda ref(w), eval(w)) and recall beta = alpha / lambda, clipped to [0, 1]."""
    angles = np.linspace(epsilon, math.pi / 2 - epsilon, num_angles)
    slopes = np.tan(angles)[:, None]
    precision = np.minimum(ref_hist[None, :] * slopes, eval_hist[None, :]).sum(1)
    recall = precision / slopes[:, 0]
    return np.clip(precision, 0, 1), np.clip(recall, 0, 1)


def f_beta(precision, recall, beta):
    """F_beta of each point of a PRD curve; 0 where precision = recall = 0."""
    p, r = np.asarray(precision), np.asarray(recall)
    num = (1 + beta ** 2) * p * r
    den = beta ** 2 * p + r
    return np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)


def _kmeans_labels(data, k, n_init, rng):
    """Cluster labels of the best (lowest inertia) of `n_init` k-means++ runs (scipy's kmeans2)."""
    import inspect
    import warnings

    from scipy.cluster.vq import kmeans2

    # SciPy 1.15 renamed kmeans2's `seed` to `rng`; both accept a numpy Generator.
    key = "rng" if "rng" in inspect.signature(kmeans2).parameters else "seed"
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # "one of the clusters is empty": harmless here
            centroids, labels = kmeans2(data, k, minit="++", **{key: rng})
        inertia = ((data - centroids[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def prd_scores(feat_fake, feat_real, num_clusters=20, num_angles=1001, num_runs=10, n_init=10,
               beta=8, seed=0):
    """(F_8, F_1/8) of the PRD curve (Sajjadi et al. 2018): k-means with 20 clusters on the
    union of both (equal-size) feature sets, histograms of cluster labels per set, the PRD curve
    of the two histograms, averaged over 10 runs; then the maximum F_beta over the curve (F_8
    weighs recall: mode coverage; F_1/8 weighs precision: quality). Each run keeps the best of
    10 k-means initialisations, as the reference's MiniBatchKMeans(n_init=10); our k-means is
    scipy's full-batch kmeans2 with k-means++ seeding."""
    fake, real = _balanced(feat_fake, feat_real, seed)
    n = len(fake)
    if n < num_clusters:
        raise UsageError(f"PRD needs at least {num_clusters} samples per set, got {n}")
    data = np.concatenate([fake, real]).astype(np.float64)
    rng = np.random.default_rng(seed)
    precisions, recalls = [], []
    for _ in range(num_runs):
        labels = _kmeans_labels(data, num_clusters, n_init, rng)
        eval_hist = np.bincount(labels[:n], minlength=num_clusters) / n
        ref_hist = np.bincount(labels[n:], minlength=num_clusters) / n
        p, r = prd_curve(eval_hist, ref_hist, num_angles)
        precisions.append(p)
        recalls.append(r)
    p, r = np.mean(precisions, 0), np.mean(recalls, 0)
    return float(f_beta(p, r, beta).max()), float(f_beta(p, r, 1.0 / beta).max())


def i_variance(logits, splits=10):
    """I-Variance as MaEM-GAN's Table 4 reports it (mean, std over splits; the paper prints x1e-3).

    Official code (HaozheLiu-ST/MEE, inception_variance.py): class probabilities of Inception-v3,
    for each class the std over the images of a split (population std), averaged over classes;
    10 splits of N // 10 consecutive rows (the remainder is unused). Table 4's caption ("the
    variance of the class-wise outputs") describes this form, not Eq. 15. The official code
    feeds torchvision's ImageNet Inception (1000 classes); we use the FID network's 1008-way
    softmax, so values are close to, not equal to, the paper's.
    """
    from scipy.special import softmax

    probs = softmax(np.asarray(logits, np.float64), axis=1)
    size = len(probs) // splits
    if size == 0:
        raise UsageError(f"I-Variance needs at least {splits} samples ({splits} splits), got {len(probs)}")
    scores = [probs[k * size:(k + 1) * size].std(0).mean() for k in range(splits)]
    return float(np.mean(scores)), float(np.std(scores))


# --- 7d. Statistics files and real images ---------------------------------------------------------
# An .npz with `mu` (2048,) and `sigma` (2048, 2048) in float64 is what pytorch-fid writes and
# reads (`--save-stats`); we add, when known: `n` (number of images), `p_y` (mean class
# probabilities, for the Mode Score), `features` (float32 rows of up to `feature_rows` random
# images, for KID / PR / PRD), `weights_sha256` and `key` (what produced the file, as JSON).
# pytorch-fid ignores the extra keys. VGG-16 files hold `features` only.
FEATURE_ROWS = 10_000


def save_stats(path, stats):
    tmp = path + ".tmp.npz"
    keep = {k: stats[k] for k in ("mu", "sigma", "n", "p_y", "features") if k in stats}
    for k in ("weights_sha256", "key"):
        if stats.get(k):
            keep[k] = np.array(stats[k])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(tmp, **keep)
    os.replace(tmp, path)


def load_stats(path, moments=True):
    """A statistics file as a dict; UsageError when it is unreadable or lacks mu / sigma."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as err:
        raise UsageError(f"cannot read statistics file {path} ({type(err).__name__})") from None
    for k in ("weights_sha256", "key"):
        if k in data:
            data[k] = str(data[k])
    if not moments:
        return data
    if "mu" not in data or "sigma" not in data:
        raise UsageError(f"{path} has no 'mu' and 'sigma' arrays: not an FID statistics file")
    mu, sigma = data["mu"], data["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UsageError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return data


def subset_indices(total, n=None, seed=0):
    """range(total), or a sorted random subset of n of it drawn with `seed`: the first n files of
    a class-sorted folder (ImageNet) would be a few classes."""
    if n is None or n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


class _Uint8Items(torch.utils.data.Dataset):
    # Item i of a file-backed image dataset as uint8 (C, H, W), for decoding in DataLoader workers.
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds.load_uint8(i)


def uint8_batches(ds, idx, batch_size=50, num_workers=None):
    """uint8 batches of the items `idx` of an image dataset of section 5, pixels exactly as
    training sees them (same crop and resize, before the [-1, 1] scaling)."""
    chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if hasattr(ds, "get_uint8"):                     # in-memory arrays: index directly
        return (ds.get_uint8(torch.as_tensor(c)) for c in chunks)
    if num_workers is None:                          # files: decode in worker processes
        num_workers = min(4, os.cpu_count() or 1) if len(idx) >= 1000 else 0
    return iter(torch.utils.data.DataLoader(_Uint8Items(ds), batch_sampler=[c.tolist() for c in chunks],
                                            num_workers=num_workers))


def files_digest(ds, root):
    """SHA-256 of the listing (path, size, mtime) of the files an image dataset reads: its image
    files, else every file under its root. Part of every cache key: overwritten images, same
    names and count, are a new key (issue 29: a stale cache returned FID 0.648 for 17.09)."""
    files = list(getattr(ds, "files", None) or [])
    if not files:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames)]
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def real_stats(net, dataset, root=None, split="train", img_size=None, n=None, seed=0,
               download=False, device="cpu", batch_size=50, feature_rows=FEATURE_ROWS,
               cache=True, cache_dir=None, progress=True):
    """Features of real images for `net` (the FID Inception or VGG-16), the one real-image path
    of every script and of evaluate.py: build_dataset gives the images exactly as training sees
    them (crop, resize, uint8 pixels), `n` takes a seeded random subset.

    Cached under a key of everything that changes the numbers (dataset, data root and the
    listing of its files with sizes and mtimes, split, resolution, crop, subset, feature rows,
    network and its weights), in ~/.cache/torch/fid_stats (or `cache_dir`); cache=False neither
    reads nor writes it (evaluate.py's default for folders, which may hold generated images).
    """
    info = dataset_info(dataset)
    if info["kind"] != "image":
        raise UsageError(f"{dataset} is not an image dataset")
    ds = build_dataset(dataset, root=root, split=split, img_size=img_size, download=download)
    idx = subset_indices(len(ds), n, seed)
    if len(idx) < 2:
        raise UsageError(f"{dataset} ({split}) has {len(idx)} images")
    res = img_size or info["img_size"]
    root = os.path.abspath(root or default_data_root(dataset))
    key = {"dataset": dataset, "root": root, "files": files_digest(ds, root),
           "split": split, "img_size": res, "crop": getattr(ds, "crop_rule", "none"),
           "images": len(ds), "n": len(idx), "subset_seed": seed if len(idx) < len(ds) else None,
           "feature_rows": feature_rows, "net": net.kind, "weights_sha256": net.weights_sha256}
    key_text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.dirname(torch.hub.get_dir()), "fid_stats")
    path = os.path.join(cache_dir, f"{dataset}-{split}-{res}px-n{len(idx)}-{net.kind}-{digest}.npz")
    if cache and os.path.isfile(path):
        print(f"real {net.kind} statistics: {path} (cached)", file=sys.stderr, flush=True)
        return load_stats(path, moments=net.kind == "inception")
    inception = net.kind == "inception"
    stats = FeatureStats(moments=inception, keep_features=True, keep_logits=False, total=len(idx),
                         keep_rows=feature_rows)
    with metric_precision():
        extract(_prefetched(uint8_batches(ds, idx, batch_size)), {"net": net}, {"net": stats}, device,
                total=len(idx), progress=progress, label=f"{net.kind} {dataset}")
    out = dict(stats.result(), weights_sha256=net.weights_sha256, key=key_text)
    if cache:
        save_stats(path, out)
        print(f"real {net.kind} statistics saved to {path}", file=sys.stderr, flush=True)
    return out


# --- 7e. One call for the image metrics ---------------------------------------------------------
IMAGE_METRICS = ("fid", "is", "ms", "kid", "pr", "prd", "ivar")
_NEEDS_FEATURES = {"kid", "pr", "prd"}


def parse_metrics(metrics):
    """A comma list (or a sequence) of IMAGE_METRICS names -> list; UsageError for unknown names."""
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    bad = [m for m in names if m not in IMAGE_METRICS]
    if bad or not names:
        raise UsageError(f"unknown metric {bad[0] if bad else metrics!r}: choose from {','.join(IMAGE_METRICS)}")
    return names


def check_real_stats(real, metrics, pr_features="vgg16"):
    """Fail before any sample is drawn when the real statistics cannot serve `metrics`."""
    needs = {m for m in _NEEDS_FEATURES & set(metrics) if not (m == "pr" and pr_features == "vgg16")}
    if needs and "features" not in real:
        raise UsageError(f"{', '.join(sorted(needs))} need real features, which this statistics file "
                         "lacks: give a folder, a dataset name, or a file written by evaluate.py stats")
    if "ms" in metrics and "p_y" not in real:
        raise UsageError("the Mode Score needs the real class marginal, which this statistics file "
                         "lacks: give a folder, a dataset name, or a file written by evaluate.py stats")


def image_metrics(batches, n, metrics, real, device="cpu", inception=None, inception_weights=None,
                  vgg_weights=None, pr_features="vgg16", kid_subset_size=1000,
                  feature_rows=FEATURE_ROWS, batch_size=50, progress=True, on_batch=None, cache=True,
                  cache_dir=None):
    """Image metrics of `n` generated images against real ones: the one scoring path of the
    method scripts and evaluate.py.

    batches: iterable of generated batches (uint8, or float in [-1, 1], quantised as a PNG).
    real: an .npz statistics file, or the real_stats keywords as a dict
          (dataset=..., root=..., split=..., img_size=..., n=..., download=...).
    pr_features: "vgg16" (the reference's features; needs real images, not an .npz) or
          "inception" (pool3). Returns the JSON keys of the metrics and `protocol`: which
          features and how many samples produced each number.
    """
    with metric_precision():
        return _image_metrics(batches, n, metrics, real, device, inception, inception_weights,
                              vgg_weights, pr_features, kid_subset_size, feature_rows, batch_size,
                              progress, on_batch, cache, cache_dir)


# KID and precision/recall follow torch-fidelity's formulas and networks, not its image preparation.
KID_PR_PREPARATION = ("images prepared as pytorch-fid prepares them (Inception) and resized with "
                      "F.interpolate (VGG-16), not with torch-fidelity's resize: on the same images "
                      "KID and precision/recall differ from torch-fidelity's (README, Evaluation)")
# How each network's input is made from uint8 pixels (recorded in every protocol).
INCEPTION_RESIZE = ("pytorch-fid: /255, grey -> RGB, F.interpolate bilinear to 299 "
                    "(align_corners=False, no antialias), 2x - 1")
VGG16_RESIZE = ("0..255 floats, F.interpolate bilinear to 224 (align_corners=False), ImageNet "
                "mean/std; torch-fidelity resizes with its TF1-style bilinear")


def _image_metrics(batches, n, metrics, real, device, inception, inception_weights, vgg_weights,
                   pr_features, kid_subset_size, feature_rows, batch_size, progress, on_batch, cache,
                   cache_dir):
    metrics = parse_metrics(metrics)
    if pr_features not in ("vgg16", "inception"):
        raise UsageError(f"unknown --pr-features {pr_features!r}: choose vgg16 or inception")
    inception = inception or load_fid_inception(inception_weights, device)
    real_kw = dict(device=device, batch_size=batch_size, feature_rows=feature_rows, cache=cache,
                   cache_dir=cache_dir, progress=progress)
    if isinstance(real, dict) and "cache" in real:      # a source's own say (evaluate.py: folders)
        real = dict(real)
        real_kw["cache"] = cache and real.pop("cache")
    if isinstance(real, str):
        if not os.path.isfile(real):
            raise UsageError(f"statistics file {real} does not exist")
        real_inc = load_stats(real)
        if real_inc.get("weights_sha256") and real_inc["weights_sha256"] != inception.weights_sha256:
            print(f"warning: {real} was computed with other Inception weights", file=sys.stderr, flush=True)
    else:
        real_inc = real_stats(inception, **real, **real_kw)
    check_real_stats(real_inc, metrics, pr_features)
    nets = {"inception": inception}
    gen = {"inception": FeatureStats(keep_features=bool(_NEEDS_FEATURES & set(metrics)),
                                     keep_logits=bool({"is", "ms", "ivar"} & set(metrics)))}
    if "pr" in metrics and pr_features == "vgg16":
        if isinstance(real, str):
            raise UsageError("precision/recall on VGG-16 features needs real images (a dataset or "
                             "a folder), not a statistics file; or pass --pr-features inception")
        nets["vgg16"] = load_vgg16(vgg_weights, device)
        real_vgg = real_stats(nets["vgg16"], **real, **real_kw)
        gen["vgg16"] = FeatureStats(moments=False, keep_features=True)
    extract(batches, nets, gen, device, total=n, progress=progress, label="generated", on_batch=on_batch)
    g = {name: s.result() for name, s in gen.items()}
    gi = g["inception"]
    out, used = {}, {}
    if "fid" in metrics:
        out["fid"] = fid_from_stats(gi["mu"], gi["sigma"], real_inc["mu"], real_inc["sigma"])
        used["fid"] = f"inception pool3, {gi['n']} generated vs {int(real_inc['n'])} real"
    if "is" in metrics:
        out["is_mean"], out["is_std"] = inception_score(gi["logits"])
        used["is"] = f"inception 1008 logits, {gi['n']} generated, 10 splits"
    if "ms" in metrics:
        out["mode_score"] = mode_score(gi["logits"], real_inc["p_y"])
        used["ms"] = f"inception 1008 logits, {gi['n']} generated vs the real marginal of {int(real_inc['n'])}"
    if "ivar" in metrics:
        out["ivar_mean"], out["ivar_std"] = i_variance(gi["logits"])
        used["ivar"] = f"inception 1008-way softmax, {gi['n']} generated, 10 splits"
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = kid(gi["features"], real_inc["features"],
                                              subset_size=kid_subset_size, device=device)
        used["kid"] = (f"inception pool3, 100 subsets of {kid_subset_size} from {gi['n']} generated "
                       f"and {len(real_inc['features'])} real")
    if "pr" in metrics:
        fake_f, real_f = ((g["vgg16"]["features"], real_vgg["features"]) if pr_features == "vgg16"
                          else (gi["features"], real_inc["features"]))
        out["precision"], out["recall"] = precision_recall(fake_f, real_f, device=device)
        m = min(len(fake_f), len(real_f))
        used["pr"] = (f"{'vgg16 fc2 after ReLU' if pr_features == 'vgg16' else 'inception pool3'}, "
                      f"k=3, {m} generated vs {m} real")
    if "prd" in metrics:
        out["f8"], out["f1_8"] = prd_scores(gi["features"], real_inc["features"])
        m = min(len(gi["features"]), len(real_inc["features"]))
        used["prd"] = f"inception pool3, {m} generated vs {m} real, 20 clusters, 10 runs x 10 inits"
    if {"kid", "pr"} & set(metrics):
        used["kid_pr_preparation"] = KID_PR_PREPARATION
    used.update(samples=gi["n"], real_samples=int(real_inc["n"]),
                inception_sha256=inception.weights_sha256, inception_resize=INCEPTION_RESIZE)
    if "vgg16" in nets:
        used.update(vgg16_sha256=nets["vgg16"].weights_sha256, vgg16_resize=VGG16_RESIZE)
    out["non_finite"] = gen["inception"].non_finite
    out["protocol"] = used
    return out


def in_chunks(sample, n, chunk):
    """sample(m) for m = chunk, chunk, ..., the rest: n samples in pieces (a generator)."""
    for i in range(0, n, chunk):
        yield sample(min(chunk, n - i))


@torch.no_grad()
def generate(G, n, z_dim, device, batch=1000, generator=None, z_device="cpu", bn_batch=False):
    """n samples of G(z), z ~ N(0, I), in chunks, returned on the CPU; G in the mode the caller set.
    z is drawn on `z_device` (from `generator` if given) and moved to `device`: maem_gan draws it
    on the CPU, invert_gan on the device. bn_batch=True (BigGAN): batch norm from each chunk of 50,
    as BigGAN-PyTorch samples its G_ema (train mode unless --G_eval_mode, which
    launch_cifar_ema.sh does not set; its batch 50, as 2x25 on two GPUs: README); an int: chunks of
    that many (PacGAN's sampler: PACGAN_BATCH, its TF batch_norm never leaves training mode)."""
    if bn_batch:
        batch = 50 if bn_batch is True else int(bn_batch)
    out = []
    with batch_norm_from_batch(G) if bn_batch else contextlib.nullcontext():
        for i in range(0, n, batch):
            z = torch.randn(min(batch, n - i), z_dim, generator=generator, device=z_device)
            out.append(G(z.to(device)).float().cpu())
    return torch.cat(out)


def image_metrics_or_skip(batches, n, metrics, real, device="cpu", **kwargs):
    """image_metrics, or {"skipped": why} after a note where they cannot run (no Inception weights
    offline): a finished training still counts."""
    try:
        return image_metrics(batches, n, metrics, real, device, **kwargs)
    except UsageError as err:
        print(f"note: image metrics skipped: {err}", flush=True)
        return {"skipped": str(err)}


def run_image_metrics(draw, args, metrics, device, dataset, split="train"):
    """metrics.json's image metrics of a run: --eval-samples images of draw(n) against --fid-stats or
    the run's `split` of `dataset` as training reads it (real_stats, cached); skipped offline."""
    real = args.fid_stats or dict(dataset=dataset, root=args.data_root, split=split, img_size=args.img_size,
                                  download=getattr(args, "download", False))
    return image_metrics_or_skip(in_chunks(draw, args.eval_samples, 100), args.eval_samples, metrics, real,
                                 device, inception_weights=args.inception_weights)


# --- 7f. Mode coverage ------------------------------------------------------------------------
HQ_STDS = 3.0             # high quality = within 3 data stds of the nearest centre (VEEGAN / PacGAN)
# Within-mode figures (METHODS.md, "Within-mode spread"). A mode's std is measured on >= this many
# of its high-quality samples (ours: 10 points give a std within ~17 %; fewer read as noise).
MIN_MODE_SAMPLES = 10
# MMD: samples compared (ours: the kernel sums are O(n^2), ~3 s on one core at 5K; README
# "2-D metrics" has the real-vs-real floor at this size) and the seeds of the two real references.
MMD_POINTS = 5000
MMD_REAL_SEEDS = (1, 2)


def _points_f64(samples):
    if torch.is_tensor(samples):
        samples = samples.detach().cpu().numpy()
    x = torch.as_tensor(np.asarray(samples, dtype=np.float64))
    if x.dim() != 2 or x.shape[1] != 2 or len(x) == 0:
        raise UsageError(f"samples must be a non-empty (N, 2) array, got {tuple(x.shape)}")
    return x


def mode_stats(samples, centers, std):
    """2-D mode coverage against mode centres (K, 2) with per-mode std (METHODS.md):
    high quality = within 3 std of the nearest centre (VEEGAN / PacGAN); modes = centres with at
    least one high-quality sample (as Self-Conditioned GAN's 2d_mix/evaluation.py, which PGMGAN's
    2d_mix uses; InvertGAN's paper gives no count: ours there); reverse KL = sum_i p_i log(p_i K)
    over the histogram of the nearest centre of all finite samples (natural log; 0 for a uniform
    histogram, log K for one mode). Non-finite samples (a diverged G) belong to no mode and are never high quality; their
    number is `non_finite`, and with no finite sample the reverse KL is None."""
    if torch.is_tensor(centers):
        centers = centers.detach().cpu().numpy()
    x = _points_f64(samples)
    c = torch.as_tensor(np.asarray(centers, dtype=np.float64))
    finite = torch.isfinite(x).all(1)
    x_ok = x[finite]
    out = {"modes": 0, "hq_fraction": 0.0, "reverse_kl": None, "non_finite": int((~finite).sum())}
    if len(x_ok):
        dist, nearest = torch.cdist(x_ok, c).min(1)
        hq = dist <= HQ_STDS * std
        hist = torch.bincount(nearest, minlength=len(c)).double() / len(x_ok)
        out.update(modes=int(torch.unique(nearest[hq]).numel()),
                   hq_fraction=float(hq.double().sum() / len(x)),
                   reverse_kl=_reverse_kl(hist.numpy()))
    return out


def _reverse_kl(p):
    # KL(p || uniform over K) = sum_i p_i log(p_i K), terms with p_i = 0 count 0.
    p = np.asarray(p, np.float64)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] * len(p))).sum())


def _hq_std_factor(r=HQ_STDS):
    """The per-axis std of an isotropic 2-D Gaussian (std 1) kept within radius r of its centre:
    r^2 / std^2 is chi^2_2, so E[r^2 | r <= R] / 2 = 1 - (R^2 / 2) e^(-R^2/2) / (1 - e^(-R^2/2));
    0.9744 at R = 3. A real mode measured by within_mode_stats' rule has this std."""
    q = math.exp(-r * r / 2)
    return math.sqrt(1 - (r * r / 2) * q / (1 - q))


def within_mode_stats(samples, centers, std):
    """Within-mode spread of 2-D samples: each finite sample is assigned to its nearest centre if
    it lies within 3 std of it (the high-quality rule); for each mode with >= MIN_MODE_SAMPLES
    such samples, std_ratio = their std (sqrt of the mean per-axis variance about their own mean)
    / the data's std measured the same way (std x _hq_std_factor(), since the 3-std cut trims a
    real mode too), and centre_offset = |their mean - the centre| / std. Median, min and max of
    the ratios, median and max of the offsets over those modes (None where no mode qualifies).
    A perfect sampler reads ~1 and ~0; one that halves every mode ~0.5. The 3-std cut caps what a
    too-wide mode can show (std 2x reads ~1.4): the hq fraction and the MMD see it instead."""
    x = _points_f64(samples)
    x = x[torch.isfinite(x).all(1)]
    c = torch.as_tensor(np.asarray(centers, dtype=np.float64))
    ratios, offsets = [], []
    if len(x):
        dist, nearest = torch.cdist(x, c).min(1)
        nearest[dist > HQ_STDS * std] = -1
        for k in range(len(c)):
            pts = x[nearest == k]
            if len(pts) >= MIN_MODE_SAMPLES:
                ratios.append(float(pts.var(0).mean().sqrt()) / (std * _hq_std_factor()))
                offsets.append(float((pts.mean(0) - c[k]).norm()) / std)
    med = (lambda v: float(np.median(v)) if v else None)
    return {"std_ratio_median": med(ratios), "std_ratio_min": min(ratios, default=None),
            "std_ratio_max": max(ratios, default=None), "centre_offset_median": med(offsets),
            "centre_offset_max": max(offsets, default=None)}


def mixture_points(centers, std, n, seed):
    """n points of the true mixture: mode uniform, then centre + std * N(0, I), drawn with `seed`
    (a sampler's draw: the mode counts are multinomial, unlike make_synthetic's equal split)."""
    c = torch.as_tensor(np.asarray(centers, dtype=np.float64))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(c), (n,), generator=gen)
    return c[labels] + std * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def _kernel_mean(a, b, h, same, chunk=1000):
    # mean of exp(-|a_i - b_j|^2 / 2h^2) over pairs (i != j where a is b); rows of a that are not
    # finite count 0 in every pair (a point at infinity), but in the number of pairs.
    n_a, n_b = len(a), len(b)
    ok_a, ok_b = torch.isfinite(a).all(1), torch.isfinite(b).all(1)
    a, b = a[ok_a], b[ok_b]
    total = 0.0
    for i in range(0, len(a), chunk):
        total += float(torch.cdist(a[i:i + chunk], b).square_().mul_(-0.5 / h ** 2).exp_().sum())
    if same:
        return (total - len(a)) / (n_a * (n_a - 1))
    return total / (n_a * n_b)


def mmd2(x, y, h):
    """Unbiased squared MMD of point sets x and y with the Gaussian kernel of bandwidth h."""
    return _kernel_mean(x, x, h, True) + _kernel_mean(y, y, h, True) - 2 * _kernel_mean(x, y, h, False)


_MMD_REAL = {}        # (centres, std, n) -> the real-vs-real MMD^2, computed once per process


def mmd_to_mixture(samples, centers, std):
    """{'mmd2', 'mmd2_real'}: the unbiased squared MMD, Gaussian kernel of bandwidth = the data's
    per-mode std, between the first min(N, MMD_POINTS) samples and as many points of the true
    mixture (seed MMD_REAL_SEEDS[0]); beside it the same between two real draws (both seeds),
    whose spread around 0 is the noise floor. Deterministic: fixed seeds and chunk order.
    Why an MMD at this bandwidth (ours): the modes lie 40-150 stds apart, so the kernel sees each
    mode's weight and shape at once (every mode at half width: 0.111 / K; all mass on the centres:
    0.333 / K; real-vs-real within ~1e-3 / K at 5K points), while a sliced Wasserstein distance is
    dominated by the mass moved between modes: its real-vs-real noise at 10K points exceeds a
    halved mode's signal (README, "2-D metrics")."""
    x = _points_f64(samples)[:MMD_POINTS]
    n = len(x)
    if n < 2:
        return {"mmd2": None, "mmd2_real": None}
    real = mixture_points(centers, std, n, MMD_REAL_SEEDS[0])
    key = (np.asarray(centers, dtype=np.float64).tobytes(), float(std), n)
    if key not in _MMD_REAL:
        _MMD_REAL[key] = mmd2(mixture_points(centers, std, n, MMD_REAL_SEEDS[1]), real, std)
    return {"mmd2": mmd2(x, real, std), "mmd2_real": _MMD_REAL[key]}


def mode_metrics_2d(samples, dataset, data_std=None):
    """Every 2-D figure of (N, 2) samples of `ring` or `grid`: mode_stats ('modes', 'hq_fraction',
    'reverse_kl', 'non_finite'), 'reverse_kl_hq' (InvertGAN's form), within_mode_stats,
    mmd_to_mixture and 'samples' (N, non-finite rows included). The one function behind every
    2-D metrics.json and evaluate.py points / ckpt."""
    centers, std = synthetic_modes(dataset, data_std)
    centers = centers.double().numpy()
    return dict(mode_stats(samples, centers, std), samples=len(samples),
                reverse_kl_hq=_reverse_kl_hq(samples, centers, std),
                **within_mode_stats(samples, centers, std), **mmd_to_mixture(samples, centers, std))


def _reverse_kl_hq(samples, centers, std):
    x = _points_f64(samples)
    dist, nearest = torch.cdist(x, torch.as_tensor(centers, dtype=torch.float64)).min(1)
    p = torch.bincount(nearest[dist <= HQ_STDS * std], minlength=len(centers)).double() / len(x)
    return _reverse_kl(p.numpy())


def reverse_kl_hq(samples, dataset, data_std=None):
    """InvertGAN's reverse KL (its Sec. 5.1): sum_i p_i log(p_i K) where p_i is the fraction of
    *all* samples that are high quality (within 3 std) at mode i. Low-quality samples count
    nowhere, so sum p_i < 1 and the value may be negative; `reverse_kl` is the standard one."""
    centers, std = synthetic_modes(dataset, data_std)
    return _reverse_kl_hq(samples, centers.double().numpy(), std)


EVAL_SEED = 0         # seed of the noise of every 2-D metrics.json (= evaluate.py ckpt's default --seed)


@torch.no_grad()
def sample_points(sample, n, device, seed=EVAL_SEED, chunk=10_000):
    """n points of sample(m) in chunks of `chunk`, with the RNG forked and seeded with `seed`:
    a run's metrics.json and `evaluate.py ckpt --n N --seed S` draw the very same points."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return torch.cat([torch.as_tensor(x).detach().float().cpu() for x in in_chunks(sample, n, chunk)])


def run_points_metrics(draw, args, device, dataset):
    """metrics.json of a 2-D run: mode_metrics_2d of --eval-samples points of draw(n), seeded as
    `evaluate.py ckpt` draws them (sample_points), which so reproduces these numbers."""
    return mode_metrics_2d(sample_points(draw, args.eval_samples, device).numpy(), dataset, args.data_std)


# Stacked (Fashion-)MNIST: a classifier labels each channel, a sample's mode is its triplet.
# An uncalibrated count reads every confident error as a mode: at 88 % per-channel accuracy a
# 10-mode generator reads as ~740 modes. Two rules keep the count honest (METHODS.md, "Stacked
# mode counting must be calibrated"); README shows the calibration rows they give:
#   1. a sample counts only where all three channels are classified with top probability >=
#      the classifier's `threshold`, chosen on held-out real images (train_mode_classifier);
#   2. a triplet counts as a mode only if it holds at least MIN_MODE_COUNT counted samples and
#      more than LEAK_FACTOR times what the confident errors of its one-channel neighbours are
#      expected to put there (the confusion rates of rule 1, measured on the same held-out set).
# The reverse KL is over the samples of the counted modes (those rule 2 explains as classifier
# errors belong to no mode), each weighted by 1 / (acceptance of its three classes): rule 1
# keeps fewer shirts than trousers, and the weights undo that selection. The acceptance per
# class is measured on the held-out set too. Constants chosen on README's calibration rows (ours).
MIN_MODE_COUNT = 3
LEAK_FACTOR = 3.0
MAX_HELD_OUT_ERROR = 0.02
# Samples per stacked count, everywhere (scripts, evaluate.py, calibration rows): a count depends on
# N (a perfect 1000-mode set reads 871 modes at 10K, 966 at 26K). PacGAN counts 25,600
# (fjxmlzn/PacGAN, stacked_MNIST_experiments: 200 batches of 128), so our raw counts meet its Table 3.
STACKED_SAMPLES = 25_600


class ModeClassifier(nn.Module):
    """The CNN that labels each channel of stacked (Fashion-)MNIST samples.
    (B, 1, 32, 32) in [-1, 1] -> (B, 10) logits: three conv-BN-ReLU-maxpool stages
    (32 -> 16 -> 8 -> 4 pixels, 32/64/128 channels), dropout, linear; ~10M multiply-adds per
    image, so that it trains in minutes on a CPU. `threshold` and `confusion` (rules 1 and 2
    above) are set by train_mode_classifier and saved with the weights."""

    def __init__(self, n_classes=10):
        super().__init__()

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True), nn.MaxPool2d(2)]

        self.net = nn.Sequential(*stage(1, 32), *stage(32, 64), *stage(64, 128),   # (B, 128, 4, 4)
                                 nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 16, n_classes))
        self.threshold = 0.0
        self.register_buffer("confusion", torch.eye(n_classes, dtype=torch.float64))
        self.register_buffer("acceptance", torch.ones(n_classes, dtype=torch.float64))

    def forward(self, x):
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return self.net(x)

    @torch.no_grad()
    def predict(self, images):
        """uint8 or [-1, 1] images (B, C, H, W) -> (labels (B, C), top probability (B, C)): each
        channel classified on its own, probabilities averaged over the image and its mirror image
        (training flips too; ours). Float input is quantised as a PNG would store it."""
        x = to_uint8(images).float() / 127.5 - 1.0
        b, c = x.shape[:2]
        x = x.reshape(b * c, 1, *x.shape[-2:])
        probs = (self(x).softmax(1) + self(x.flip(3)).softmax(1)) / 2
        top, labels = probs.max(1)
        return labels.view(b, c), top.view(b, c)


def _augment(x, gen):
    # Per-sample shifts of up to 2 pixels (pad with black, random crop) and horizontal flips:
    # GAN samples are not centred as carefully as the dataset's images.
    b, _, h, w = x.shape
    xp = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dy, dx = torch.randint(0, 5, (2, b), generator=gen)
    x = xp.unfold(2, h, 1).unfold(3, w, 1)[torch.arange(b), :, dy, dx]       # (B, 1, H, W)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@torch.no_grad()
def _predict_all(model, images, batch_size=1000):
    out = [model.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([o[0][:, 0] for o in out]), torch.cat([o[1][:, 0] for o in out])


def choose_threshold(top, correct, max_error):
    """The lowest confidence threshold (on a grid) whose accepted predictions have an error rate
    <= max_error on held-out data; (threshold, error rate, accepted fraction)."""
    for t in np.round(np.arange(0.5, 1.0, 0.005), 3).tolist() + [0.999, 0.9999]:
        keep = top >= t
        if keep.sum() == 0:
            break
        err = float((~correct[keep]).double().mean())
        if err <= max_error:
            return t, err, float(keep.double().mean())
    raise UsageError(f"no confidence threshold brings the held-out error under {max_error}: "
                     "the classifier is too weak (train longer: --epochs)")


def confident_confusion(labels, pred, top, threshold, n_classes=10):
    """R[i, j] = P(predicted j | true i, accepted at `threshold`), add-one smoothed, so an unseen
    confusion is not assumed impossible (held-out data have ~500 images per class)."""
    keep = top >= threshold
    counts = torch.zeros(n_classes, n_classes, dtype=torch.float64)
    counts.index_put_((labels[keep], pred[keep]), torch.ones(int(keep.sum()), dtype=torch.float64),
                      accumulate=True)
    return (counts + 1) / (counts.sum(1, keepdim=True) + n_classes)


def stacked_calibration_set(images, labels, n, k=None, seed=0, zipf=False):
    """n stacked uint8 samples (n, 3, H, W) from single-channel `images` with class `labels`:
    triplets drawn uniformly from all 1000 (k=None), or from k fixed random triplets (a
    generator that covers exactly k modes), equally often or, zipf=True, with weights 1/rank
    (a generator that favours some modes); each channel a random image of its class."""
    gen = torch.Generator().manual_seed(seed)
    if k is None:
        trip = torch.randint(0, 10, (n, 3), generator=gen)
    else:
        modes = torch.randperm(1000, generator=gen)[:k]
        weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) if zipf else torch.ones(k, dtype=torch.float64)
        chosen = modes[torch.multinomial(weights, n, replacement=True, generator=gen)]
        trip = torch.stack([chosen // 100, chosen // 10 % 10, chosen % 10], 1)
    flat = trip.flatten()
    pick = torch.empty_like(flat)
    for c in range(10):
        where, pool = flat == c, torch.nonzero(labels == c).flatten()
        pick[where] = pool[torch.randint(0, len(pool), (int(where.sum()),), generator=gen)]
    return images[pick.view(n, 3)].squeeze(2), trip                        # (n, 3, H, W)


# The rows `evaluate.py classifier` prints, (true modes, Zipf-weighted, seed offset). The first three
# are the rows MIN_MODE_COUNT and LEAK_FACTOR were chosen on; the others check them on sets they
# were not chosen on (other draws, 37 modes, unequal mode weights). README lists them.
CALIBRATION_ROWS = ((1000, False, 0), (100, False, 0), (10, False, 0),
                    (1000, False, 1), (100, False, 1), (37, False, 1), (37, True, 1), (10, True, 1))


@contextlib.contextmanager
def reproducible_cpu():
    """One thread and deterministic kernels: CPU training gives the same bytes run after run
    (same PyTorch build and CPU; README, "mode classifier")."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def train_mode_classifier(dataset, out, root=None, device="cpu", epochs=12, batch_size=128,
                          lr=3e-3, seed=0, download=False, held_out=5000,
                          calibration_samples=STACKED_SAMPLES, log=print):
    """Train ModeClassifier on mnist / fashion-mnist and save it, calibrated, to `out`.

    The train split minus its last `held_out` images trains the network (AdamW, one-cycle lr,
    shifts and flips, a seeded data order; on the CPU in one thread with deterministic kernels,
    so the same call writes the same file); the held-out images choose the confidence threshold
    (accepted channels' error <= MAX_HELD_OUT_ERROR) and measure the confusion rates; the test
    split gives the accuracy and the calibration rows (CALIBRATION_ROWS: stacked test samples
    covering K known modes, each counted by stacked_mode_metrics). Returns the saved metadata.
    """
    if dataset not in ("mnist", "fashion-mnist"):
        raise UsageError(f"the mode classifier trains on mnist or fashion-mnist, not {dataset!r}")
    train = build_dataset(dataset, root=root, split="train", img_size=32, download=download)
    test = build_dataset(dataset, root=root, split="test", img_size=32, download=download)
    held_out = min(held_out, len(train) // 5)
    n_train = len(train) - held_out
    if n_train < batch_size:
        raise UsageError(f"{dataset} has {len(train)} training images, too few for batches of {batch_size}")
    device = torch.device(device)
    t0 = time.time()
    with reproducible_cpu() if device.type == "cpu" else contextlib.nullcontext():
        torch.manual_seed(seed)                              # weights and dropout
        model = ModeClassifier().to(device)
        steps = epochs * (n_train // batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        gen = torch.Generator().manual_seed(seed)            # data order and augmentation
        step = 0
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(n_train, generator=gen)
            for i in range(n_train // batch_size):
                x, y = train.get_batch(perm[i * batch_size:(i + 1) * batch_size])
                loss = F.cross_entropy(model(_augment(x, gen).to(device)), torch.as_tensor(y).to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step % 100 == 0:
                    rate = step / (time.time() - t0)
                    log(f"classifier epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss.item():.3f} "
                        f"{rate:.1f} it/s ETA {format_duration((steps - step) / rate)}")
        model.eval()
        held = torch.arange(n_train, len(train))
        pred, top = _predict_all(model, train.get_uint8(held).to(device))
        truth = torch.as_tensor(train.labels)[held]
        model.threshold, held_error, held_kept = choose_threshold(top.cpu(), pred.cpu() == truth,
                                                                  MAX_HELD_OUT_ERROR)
        model.confusion = confident_confusion(truth, pred.cpu(), top.cpu(), model.threshold).to(device)
        accepted = (top.cpu() >= model.threshold).double()
        model.acceptance = torch.stack([accepted[truth == c].mean() for c in range(10)]).to(device)
        test_images, test_labels = test.get_uint8(torch.arange(len(test))), torch.as_tensor(test.labels)
        pred, _ = _predict_all(model, test_images.to(device))
        acc = float((pred.cpu() == test_labels).double().mean())
        model.test_accuracy, model.dataset, model.sha256 = acc, dataset, None
        rows = []
        for k, zipf, offset in CALIBRATION_ROWS:
            x, trip = stacked_calibration_set(test_images, test_labels, calibration_samples,
                                              None if k == 1000 else k, seed + offset, zipf)
            p = torch.bincount(trip[:, 0] * 100 + trip[:, 1] * 10 + trip[:, 2], minlength=1000).double()
            m = stacked_mode_metrics(x, model, device)
            m.pop("protocol")
            rows.append(dict(true_modes=k, zipf=zipf, seed=seed + offset, samples=calibration_samples,
                             true_reverse_kl=_reverse_kl((p / p.sum()).numpy()), **m))
    meta = {"dataset": dataset, "test_accuracy": acc, "held_out": held_out,
            "held_out_error": held_error, "held_out_accepted": held_kept, "calibration": rows,
            "recipe": dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device.type,
                           torch=str(torch.__version__))}
    save_mode_classifier(out, model, **meta)
    return dict(meta, threshold=model.threshold, seconds=time.time() - t0, sha256=file_sha256(out))


def save_mode_classifier(path, model, **meta):
    """Write a ModeClassifier with its threshold and confusion rates (atomic)."""
    import io

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()             # a file's zip records are named after it; a buffer's are not
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "format": 2,
                "threshold": float(model.threshold), **meta}, buf)
    with open(path + ".tmp", "wb") as f:
        f.write(buf.getvalue())
    os.replace(path + ".tmp", path)


def load_mode_classifier(path, device="cpu", dataset=None):
    """A calibrated ModeClassifier saved by train_mode_classifier, in eval mode, with the file's
    SHA-256, test accuracy and dataset as attributes (every count records them). `dataset`
    (e.g. "stacked-fashion-mnist"): refuse a classifier trained on another dataset."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"classifier {path} does not exist (train it: evaluate.py classifier)") from None
    except Exception as err:
        raise UsageError(f"{path} is not a mode classifier saved by evaluate.py classifier "
                         f"({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(f"{path} is not a mode classifier saved by evaluate.py classifier")
    if ckpt.get("format") != 2 or "threshold" not in ckpt:
        raise UsageError(f"{path} is an uncalibrated classifier of an older version: train a new "
                         "one with evaluate.py classifier")
    model = ModeClassifier()
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise UsageError(f"{path} does not hold this version's ModeClassifier: train a new one "
                         "with evaluate.py classifier") from None
    model.threshold, model.dataset = float(ckpt["threshold"]), ckpt.get("dataset")
    model.test_accuracy, model.sha256 = ckpt.get("test_accuracy"), file_sha256(path)
    if dataset is not None and dataset.replace("stacked-", "") != model.dataset:
        raise UsageError(f"{path} was trained on {model.dataset}, not on {dataset.replace('stacked-', '')}: "
                         f"its counts of {dataset} would be meaningless (train one with evaluate.py "
                         f"classifier --dataset {dataset.replace('stacked-', '')})")
    return model.to(device).eval()


def count_modes(counts, confusion):
    """Rule 2 on a (10, 10, 10) histogram of counted triplets: a triplet is a mode if it holds
    at least MIN_MODE_COUNT samples and more than LEAK_FACTOR times its expected leak
    sum_c sum_{j != e_c} counts[e with channel c set to j] * R[j, e_c]."""
    n = counts.double()
    r = confusion.double().cpu()
    off = r - torch.diag(torch.diagonal(r))                          # R with a zero diagonal
    leak = (torch.einsum("jbc,ja->abc", n, off) + torch.einsum("ajc,jb->abc", n, off)
            + torch.einsum("abj,jc->abc", n, off))
    return (n >= MIN_MODE_COUNT) & (n > LEAK_FACTOR * leak)


def run_stacked_metrics(draw, args, device, dataset):
    """metrics.json of a stacked run: --eval-samples of draw(n) counted with --classifier (pacgan: in
    chunks of 512, whole batches of 128 on batch statistics)."""
    classifier = load_mode_classifier(args.classifier, device, dataset)
    chunk = 512 if args.arch == "pacgan" else 500
    return stacked_mode_metrics(in_chunks(draw, args.eval_samples, chunk), classifier, device)


@torch.no_grad()
def stacked_mode_metrics(images, classifier, device="cpu", batch_size=500):
    """Calibrated mode coverage of stacked (Fashion-)MNIST samples (rules 1 and 2 above), and
    the raw count beside it.

    images: (N, 3, H, W) uint8 or in [-1, 1] (quantised as a PNG), or an iterable of such
    batches (streamed). A sample's mode is 100a + 10b + c (a, b, c the R, G, B labels, the label
    layout of section 5). Returns
      modes (out of 1000), reverse_kl = KL(histogram of the counted samples on counted modes ||
        uniform over 1000), natural log (PacGAN, VEEGAN; PGMGAN's table is log10), and
        counted_fraction (samples whose three channels passed the threshold): calibrated;
      modes_raw, kl_raw: PacGAN's count, the number of distinct triplets of per-channel argmax
        labels over all finite samples and KL(their histogram || uniform over 1000), natural log;
      non_finite: samples with a NaN / inf pixel (a diverged G), which belong to no mode;
      protocol: N, the classifier (SHA-256, dataset, test accuracy, threshold) and the rules.
    """
    device = torch.device(device)
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size)) \
        if torch.is_tensor(images) else images
    counts = torch.zeros(1000, dtype=torch.long)
    raw = torch.zeros(1000, dtype=torch.long)
    weighted = torch.zeros(1000, dtype=torch.float64)
    accept = classifier.acceptance.double().cpu().clamp(min=1e-3)
    total = non_finite = 0
    with metric_precision():
        for x in batches:
            if x.dim() != 4 or x.shape[1] != 3:
                raise UsageError(f"stacked samples must be (N, 3, H, W), got {tuple(x.shape)}")
            total += len(x)
            if x.dtype != torch.uint8:
                finite = torch.isfinite(x).flatten(1).all(1)
                non_finite += int((~finite).sum())
                x = x[finite]
            if len(x) == 0:
                continue
            labels, top = classifier.predict(x.to(device))
            labels = labels.cpu()
            ok = (top >= classifier.threshold).all(1).cpu()
            mode = labels[:, 0] * 100 + labels[:, 1] * 10 + labels[:, 2]
            raw += torch.bincount(mode, minlength=1000)
            counts += torch.bincount(mode[ok], minlength=1000)
            w = 1.0 / accept[labels[ok]].prod(1)
            weighted += torch.bincount(mode[ok], weights=w, minlength=1000)
    if total == 0:
        raise UsageError("no samples to classify")
    out = {"modes": 0, "reverse_kl": None, "counted_fraction": 0.0, "modes_raw": int((raw > 0).sum()),
           "kl_raw": _reverse_kl((raw.double() / raw.sum()).numpy()) if raw.sum() else None,
           "non_finite": non_finite}
    counted = int(counts.sum())
    if counted:
        modes = count_modes(counts.view(10, 10, 10), classifier.confusion).flatten()
        on_modes = weighted * modes
        out.update(modes=int(modes.sum()), counted_fraction=counted / total,
                   reverse_kl=_reverse_kl((on_modes / on_modes.sum()).numpy()) if modes.any() else None)
    out["protocol"] = {
        "samples": total, "classifier_sha256": getattr(classifier, "sha256", None),
        "classifier_dataset": getattr(classifier, "dataset", None),
        "classifier_test_accuracy": getattr(classifier, "test_accuracy", None),
        "threshold": float(classifier.threshold),
        "modes": f"all 3 channels with flip-averaged top probability >= threshold; a mode holds "
                 f">= {MIN_MODE_COUNT} such samples and > {LEAK_FACTOR:g} x its neighbours' expected leak",
        "modes_raw": "argmax per channel (same classifier), no threshold, a mode = a triplet seen once (PacGAN)"}
    return out
