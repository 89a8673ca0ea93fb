"""Training throughput of each script's paper configuration, and Inception feature throughput.

    python tests/bench_gpu.py --device cuda                          # the paper sizes (README "GPU throughput")
    python tests/bench_gpu.py --device cpu --tiny                    # every row at a tiny size, CPU, minutes
    python tests/bench_gpu.py --device cuda --rows invert --modes fp32,bf16 --steps 300

Rows (each script's own main(), its preset, random CIFAR-shaped uint8 images held in memory in place
of the dataset: no file is read and nothing is downloaded):
    invert       invert_gan.py --dataset cifar10 (App. A.2 ResNets G/F, SN-ResNet D, batch 64)
    maem         maem_gan.py --dataset cifar10 (DCGAN 64, n_critic 3, batch 64)
    pgm          pgm_gan.py --dataset cifar10, GAN stage (SNGAN ResNet, n_dis 4, k 200, batch 100,
                 the preset's 20-block partitioner S in the step); the pretext and partition stages
                 run first for 1 step each (their files only feed the GAN stage, which is timed)
    maem-sfm     maem_gan.py --dataset stacked-fashion-mnist (its preset is the DCGAN one)
    pgm-sfm      pgm_gan.py --dataset stacked-fashion-mnist --arch dcgan (tests/bench_stacked.py's
                 DCGAN config: width 64, z 128, batch 64, k 200), GAN stage
Modes: fp32 (on CUDA the runtime turns TF32 on, so its % is of the TF32 peak), bf16 (--amp bf16),
compile (--amp bf16 --compile: the README table's "bf16 + compile" column).

Columns. it/s: G steps per second, the median of log.jsonl's `it_s` after the first log interval
(which holds start-up and compilation), as the README table was measured; ms/step = 1000 / it/s.
TFLOP/s: FLOPs of one G step (torch.utils.flop_counter.FlopCounterMode, eager: the run of 3 steps
minus the run of 1, so set-up and the end of the run cancel) x it/s. % peak: of the device's dense
peak for the mode's precision (PEAKS; blank for a device not in the table, e.g. any CPU).
syncs/step: host reads of device values per G step (item / float / bool / int of a tensor, tolist,
.cpu(), nonzero-style ops, linalg error checks, blocking host-to-device copies), counted by
SyncCounter over the same 3 - 1 steps; each is a stall of the host on a GPU.

Inception: img/s of common.py's FID Inception (common.inception_input + FIDInceptionV3) and of
pytorch-fid's InceptionV3 (pool3), both with the same random state dict (the standard weights cannot
be downloaded here; a speed figure needs none), on the same uint8 images already on the device, and
max |ours - theirs| / max |theirs| of the features (must be <= 1e-4). pytorch-fid is optional.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import common  # noqa: E402

# Dense peaks in TFLOP/s by a substring of torch.cuda.get_device_name (datasheet values, no sparsity).
PEAKS = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.7, "fp32": 67.0}),       # SXM
    ("H200", {"bf16": 989.0, "tf32": 494.7, "fp32": 67.0}),       # same chip as H100 SXM
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]
MODES = {"fp32": [], "bf16": ["--amp", "bf16"], "compile": ["--amp", "bf16", "--compile"]}

# (key, script, label, flags of the paper configuration)
ROWS = [
    ("invert", "invert_gan", "invert_gan cifar10", ["--dataset", "cifar10"]),
    ("maem", "maem_gan", "maem_gan cifar10", ["--dataset", "cifar10"]),
    ("pgm", "pgm_gan", "pgm_gan cifar10 (GAN stage)", ["--dataset", "cifar10"]),
    ("maem-sfm", "maem_gan", "maem_gan stacked-fmnist DCGAN", ["--dataset", "stacked-fashion-mnist"]),
    ("pgm-sfm", "pgm_gan", "pgm_gan stacked-fmnist DCGAN (GAN stage)",
     ["--dataset", "stacked-fashion-mnist", "--arch", "dcgan", "--width", "64", "--z-dim", "128",
      "--batch-size", "64", "--k", "200"]),
]
ROW = {r[0]: r for r in ROWS}
# Flags that make the pretext and partition stages 1 step each (they only produce the GAN stage's input).
PGM_PREP = ["--pretext-steps", "1", "--part-steps", "1", "--part-restarts", "1", "--part-samples", "2000",
            "--pi-samples", "2000"]
# --tiny: the same rows shrunk for a CPU (ours): width 8, batch 8, few steps; nothing to conclude.
TINY = {
    "invert": ["--width", "8", "--batch-size", "8"],
    "maem": ["--width", "8", "--batch-size", "8", "--m", "4"],
    "pgm": ["--width", "8", "--batch-size", "8", "--k", "4", "--part-blocks", "1", "--part-width", "8",
            "--part-levels", "1", "--pretext-batch-size", "16", "--part-batch-size", "16"],
    "maem-sfm": ["--width", "8", "--batch-size", "8", "--m", "4"],
    "pgm-sfm": ["--width", "8", "--batch-size", "8", "--k", "4", "--part-blocks", "1", "--part-width", "8",
                "--part-levels", "1", "--pretext-batch-size", "16", "--part-batch-size", "16"],
}
TINY_PREP = ["--part-samples", "64", "--pi-samples", "64", "--neighbors", "3"]


# --- Counting host synchronisations ------------------------------------------------------------
# aten ops that make the host wait for the device on CUDA: a scalar read (item / float / bool / int /
# `if tensor`), output sizes that depend on values, linalg's error checks.
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_dim", "unique_consecutive",
            "_linalg_check_errors", "repeat_interleave")


class SyncCounter(TorchDispatchMode):
    """Counts, while active, the calls that stall the host on a GPU: the SYNC_OPS above (seen at the
    dispatcher, so `if t:`, float(t), t.item() and boolean-mask indexing all count) and, by wrapping
    torch.Tensor, .tolist() / .numpy() / .cpu() / blocking .to(device) of a CPU tensor (on a CPU
    run these never reach the dispatcher: counting them is the point of running this on a CPU).
    `counts` maps each kind to its number of calls."""

    def __init__(self):
        super().__init__()
        self.counts = {}
        self._saved = {}

    def _add(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            name = "boolean-mask index"          # its size depends on the mask: a nonzero inside
            if not self._host_only(args):
                self._add(name)
        elif name in SYNC_OPS and not self._host_only(args):
            self._add(name)
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _host_only(args):
        """A read of a CPU tensor during a GPU run (e.g. CPU RNG draws) stalls nothing: not counted.
        On a CPU run every tensor is a host tensor, so there every read counts (an upper bound)."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        return bool(tensors) and torch.cuda.is_initialized() and all(t.device.type == "cpu" for t in tensors)

    def _wrap(self, attr, counts):
        original = getattr(torch.Tensor, attr)
        self._saved[attr] = original
        counter = self

        def wrapped(t, *a, **k):
            name = counts(t, a, k)
            if name:
                counter._add(name)
            return original(t, *a, **k)

        setattr(torch.Tensor, attr, wrapped)

    @staticmethod
    def _blocking_h2d(t, a, k):
        # Only a real host-to-device copy (a GPU run): on a CPU run nothing tells a batch on its way
        # to the device from a tensor that is already there (tests/bench_gpu.py's docstring).
        device = k.get("device", a[0] if a and isinstance(a[0], (str, torch.device)) else None)
        if device is None or t.device.type != "cpu" or torch.device(device).type == "cpu" \
                or k.get("non_blocking", False) or (len(a) > 1 and a[1] is True):
            return None
        return "blocking to(device) of a CPU tensor"

    def __enter__(self):
        self._wrap("tolist", lambda t, a, k: "tolist")
        self._wrap("numpy", lambda t, a, k: "numpy")
        self._wrap("cpu", lambda t, a, k: "cpu")
        self._wrap("to", self._blocking_h2d)
        return super().__enter__()

    def __exit__(self, *exc):
        for attr, original in self._saved.items():
            setattr(torch.Tensor, attr, original)
        self._saved = {}
        return super().__exit__(*exc)

    def total(self):
        return sum(self.counts.values())


# --- Running a script on random images -------------------------------------------------------------
def random_images(n, size=32, channels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    return common.TensorImageDataset(images, torch.randint(0, 10, (n,), generator=gen))


@contextlib.contextmanager
def stubbed(module, n_images):
    """The script with its dataset replaced by random CIFAR-shaped images in memory, and its pictures
    and final metrics (outside the training loop: not what is timed) turned off."""
    saved = {"build_dataset": common.build_dataset}
    common.build_dataset = lambda *a, **k: random_images(n_images)
    names = ["save_samples", "final_metrics", "figure3"]
    for name in names:
        if hasattr(module, name):
            saved[name] = getattr(module, name)
    if hasattr(module, "save_samples"):
        module.save_samples = lambda *a, **k: None
    if hasattr(module, "figure3"):
        module.figure3 = lambda *a, **k: None
    if hasattr(module, "final_metrics"):
        module.final_metrics = lambda *a, **k: {}
    try:
        yield
    finally:
        common.build_dataset = saved.pop("build_dataset")
        for name, value in saved.items():
            setattr(module, name, value)


def run_main(module, argv):
    """module.main(argv), its console output kept out of the table (returned)."""
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        module.main(argv)
    return buf.getvalue()


class Row:
    def __init__(self, key, device, tiny, steps, log_every, n_images, work):
        import importlib

        self.key, self.device, self.tiny = key, device, tiny
        _, script, self.label, flags = ROW[key]
        self.module = importlib.import_module(script)
        self.flags = flags + (TINY[key] if tiny else [])
        self.steps, self.log_every, self.n_images = steps, log_every, n_images
        self.work = work
        self.prep = None
        if script == "pgm_gan":
            self.prep = os.path.join(work, f"{key}-prep")
            stages = PGM_PREP + (TINY_PREP if tiny else [])
            with stubbed(self.module, n_images):
                for stage in ("pretext", "partition"):
                    run_main(self.module, self.flags + stages + self.common(1, 1, self.prep, [])
                             + ["--stage", stage])

    def common(self, steps, log_every, out, mode_flags):
        return ["--steps", str(steps), "--log-every", str(log_every), "--ckpt-every", str(steps * log_every),
                "--sample-every", str(steps), "--out", out, "--device", self.device, "--eval-samples", "1",
                *mode_flags] + (["--threads", "1"] if self.device == "cpu" else [])

    def _run(self, name, steps, log_every, mode_flags):
        out = os.path.join(self.work, f"{self.key}-{name}")
        shutil.rmtree(out, ignore_errors=True)
        extra = []
        if self.prep:
            shutil.copytree(self.prep, out)
            extra = ["--stage", "gan"] + PGM_PREP + (TINY_PREP if self.tiny else [])
        with stubbed(self.module, self.n_images):
            run_main(self.module, self.flags + extra + self.common(steps, log_every, out, mode_flags))
        return out

    def per_step(self):
        """(FLOPs, syncs by kind) of one G step, eager fp32: 3 steps minus 1 step."""
        from torch.utils.flop_counter import FlopCounterMode

        totals = []
        for steps in (1, 3):
            flops = FlopCounterMode(display=False)
            syncs = SyncCounter()
            with flops, syncs:
                self._run(f"count{steps}", steps, steps, [])     # one log line, at the end
            totals.append((flops.get_total_flops(), dict(syncs.counts)))
        (f1, s1), (f3, s3) = totals
        kinds = {k: (s3.get(k, 0) - s1.get(k, 0)) / 2 for k in set(s1) | set(s3)}
        return (f3 - f1) / 2, {k: v for k, v in kinds.items() if v}

    def speed(self, mode):
        """G steps per second: the median it_s of log.jsonl after its first interval."""
        out = self._run(mode, self.steps, self.log_every, MODES[mode])
        return speed_from_log(os.path.join(out, "log.jsonl"))


def speed_from_log(path):
    with open(path) as f:
        speeds = [json.loads(line)["it_s"] for line in f if line.strip()]
    if len(speeds) < 2:
        raise ValueError(f"{path}: {len(speeds)} log line(s); need 2 or more (raise --steps)")
    return statistics.median(speeds[1:])


def device_peaks(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS:
        if key in name:
            return peaks
    return None


def percent_of_peak(tflops, mode, peaks, device_type):
    if not peaks:
        return None
    precision = "bf16" if mode in ("bf16", "compile") else ("tf32" if device_type == "cuda" else "fp32")
    return 100.0 * tflops / peaks[precision]


# --- Inception features -----------------------------------------------------------------------------
def bench_inception(device, n_images, batch, reps, work):
    """{name: img/s} of common's FID Inception and pytorch-fid's (when installed), plus the relative
    difference of their features; the same random weights and uint8 images on `device`."""
    from bench_metrics import pytorch_fid_model, random_fid_weights

    weights = random_fid_weights(os.path.join(work, "inception-random.pth"))
    ours = common.load_fid_inception(weights, device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
    nets = {"ours": lambda x: ours(common.inception_input(x))}
    try:
        theirs = pytorch_fid_model(weights).to(device)
        nets["pytorch-fid"] = lambda x: theirs(x.float() / 255.0)[0].flatten(1)
        note = ""
    except ImportError:
        note = "pytorch-fid is not installed: its column is skipped"
    result, feats = {}, {}
    with torch.no_grad():
        for name, net in nets.items():
            net(images[:batch])                                    # warm-up (kernel choice)
            sync(device)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                out = [net(images[i:i + batch]) for i in range(0, n_images, batch)]
                sync(device)
                times.append(time.perf_counter() - t)
            feats[name] = torch.cat(out).float().cpu()
            result[name] = n_images / statistics.median(times)
    if "pytorch-fid" in feats:
        ref = feats["pytorch-fid"]
        result["rel_diff"] = ((feats["ours"] - ref).abs().max() / ref.abs().max()).item()
    return result, note


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- The table ---------------------------------------------------------------------------------------
def fmt(value, digits):
    return "" if value is None else f"{value:.{digits}f}"


def table(results):
    lines = ["| row | mode | G steps/s | ms/step | GFLOP/step | TFLOP/s | % peak | syncs/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['mode']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['label']} | {r['mode']} | {r['it_s']:.2f} | {r['ms']:.1f} | {r['gflop']:.4g} | "
                     f"{r['tflops']:.4g} | {fmt(r['peak_pct'], 2)} | {r['syncs']:g} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="tiny widths/batches/steps (a CPU smoke run)")
    p.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    p.add_argument("--modes", default="fp32,bf16,compile", help="comma-separated: fp32, bf16, compile")
    p.add_argument("--steps", type=int, default=None, help="G steps of each timed run (500; 6 with --tiny)")
    p.add_argument("--log-every", type=int, default=None, help="steps per it/s sample (50; 2 with --tiny)")
    p.add_argument("--inception-images", type=int, default=None, help="images per pass (2000; 4 with --tiny)")
    p.add_argument("--no-inception", action="store_true")
    p.add_argument("--json", default=None, help="also write every number to this file")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}: choose from {sorted(MODES)}")
    steps = args.steps or (6 if args.tiny else 500)
    log_every = args.log_every or (2 if args.tiny else 50)
    if steps < 2 * log_every:
        p.error("--steps must be at least 2 x --log-every (the first interval is not counted)")
    device = common.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1) if args.tiny else None
    peaks = device_peaks(device)
    work = tempfile.mkdtemp(prefix="bench_gpu-")
    n_images = 256 if args.tiny else 4096
    results = []
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + (", --tiny (not comparable to full-size figures)" if args.tiny else ""), flush=True)
    try:
        for key in args.rows:
            label = ROW[key][2]
            try:
                row = Row(key, args.device, args.tiny, steps, log_every, n_images, work)
                flops, syncs = row.per_step()
            except Exception as err:               # one broken row does not lose the others
                results += [dict(label=label, mode=m, error=f"{type(err).__name__}: {err}"[:200]) for m in modes]
                continue
            detail = ", ".join(f"{k} {v:g}" for k, v in sorted(syncs.items())) or "none"
            print(f"{label}: {flops / 1e9:.4g} GFLOP per G step; host syncs per G step: {detail}", flush=True)
            for mode in modes:
                try:
                    it_s = row.speed(mode)
                except Exception as err:
                    results.append(dict(label=label, mode=mode, error=f"{type(err).__name__}: {err}"[:200]))
                    continue
                tflops = flops * it_s / 1e12
                results.append(dict(label=label, mode=mode, it_s=it_s, ms=1000.0 / it_s, gflop=flops / 1e9,
                                    tflops=tflops, peak_pct=percent_of_peak(tflops, mode, peaks, device.type),
                                    syncs=sum(syncs.values()), sync_kinds=syncs))
                print(f"  {mode}: {it_s:.2f} it/s", flush=True)
        inception = None
        if not args.no_inception:
            n = args.inception_images or (4 if args.tiny else 2000)
            batch = 2 if args.tiny else 200
            inception, note = bench_inception(device, n, batch, 2 if args.tiny else 3, work)
            if note:
                print(f"note: {note}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(results))
    if inception is not None:
        print()
        print("| Inception features | img/s |")
        print("|---|---|")
        print(f"| common.py FID Inception | {inception['ours']:.2f} |")
        if "pytorch-fid" in inception:
            print(f"| pytorch-fid InceptionV3 | {inception['pytorch-fid']:.2f} |")
            ok = inception["rel_diff"] <= 1e-4
            print(f"\nfeatures: max |ours - pytorch-fid| / max |pytorch-fid| = {inception['rel_diff']:.2e} "
                  f"({'ok' if ok else 'ABOVE 1e-4'}); speed ratio {inception['ours'] / inception['pytorch-fid']:.2f}x")
    if args.json:
        common.write_json(args.json, {"device": str(device), "tiny": args.tiny, "rows": results,
                                      "inception": inception})
    failed = any("error" in r for r in results) or (
        inception is not None and "rel_diff" in inception and not inception["rel_diff"] <= 1e-4)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
