"""Mode coverage on stacked Fashion-MNIST: each method beside its own baseline, several seeds.

    python tests/bench_stacked.py --device cpu --tiny --out runs/stacked-tiny        # every row, tiny, CPU
    python tests/bench_stacked.py --device cuda --out runs/stacked --time-limit 540  # the GPU plan, one piece
    python tests/bench_stacked.py --out runs/stacked --summary                       # the table of what is done

Rows (each method beside its own baseline: same script, networks, batch and number of G steps;
only the flags below differ):
    maem-base      MaEM-GAN baseline: L_MaF alone (--no-disomap --no-dlle --no-entropy)
    maem           MaEM-GAN, all terms
    invert-gan     InvertGAN baseline: plain GAN (--lambda-cons 0 --gauss-loss none)
    invert         InvertGAN, p-norm Gaussian loss (the paper's choice)
    pgm-gan        PGMGAN baseline: one plain GAN (--k 1)
    pgm            PGMGAN: learned partition + guide
    pgm-partition  Partition GAN (--guide-weight 0): PGMGAN's pretext and partition files, no guide

How it runs. Every (row, seed) is one process of the method's script (`--jobs` at a time, one CPU
thread each; on a GPU they all share the device). A run whose metrics.json exists is done and
skipped; a run cut off earlier continues with --resume from its ckpt.pt (for PGMGAN also from a
finished pretext.pt / partition.pt); a run cut off before its first checkpoint starts again. The
mode classifier is trained once (`evaluate.py classifier`, i.e. common.train_mode_classifier)
unless --classifier names one, as one more job beside the runs. Each finished run is then counted
here, the same way for every row: its ckpt.pt's sampler (the script's load_sampler, as
`evaluate.py ckpt` uses it; PGMGAN's with its rejection step), a fixed sampling seed,
`--eval-samples` samples, common.stacked_mode_metrics (calibrated: confidence threshold and
confusion rule). The counts go to RUN/modes.json and the first 32 samples to RUN/grid.png; the
table (mean ± std over seeds) to OUT/table.md, one sample grid per row to OUT/grids/, and every
run's numbers to OUT/results.json. `--time-limit S` stops the runs after S seconds (they continue
from their last checkpoint next time), counts what is finished and exits with code 3; the same
command again picks up where it stopped, so a long table is run in pieces.

Architectures (ours, stated): MaEM-GAN and PGMGAN use the DCGAN G/D at 32x32 (`--arch dcgan`).
invert_gan.py has neither a stacked preset nor a DCGAN option (its F has only the MLP and the
App. A.2 ResNet encoders, common.build_encoder), so the InvertGAN rows use its App. A.2 ResNets
(`invert-resnet`, G Table 4, F Table 3, SN-ResNet D) at 32x32, with its cifar10 preset (the same
32x32x3 shape) registered for stacked-fashion-mnist by the `invert-gan-run` shim below, which also
leaves the mode count to this runner (invert_gan.py has no --classifier). Each pair compares
like with like; across methods the networks differ.

The GPU plan (`--device cuda`, the default size): 3 seeds x 7 rows = 21 runs, 5000 G steps of batch
64 each (each method keeps its own D:G ratio: MaEM-GAN n_critic 3, InvertGAN n_dis 1, PGMGAN n_dis
4, their presets), width 64 (the DCGAN's 512-256-128), PGMGAN with k = 200 (Table 1) and reduced
stages (SimCLR 3000 steps of batch 256, an 8-block width-64 partitioner trained 3000 steps: the
preset's 49K + 20K steps of a 20-block one would take the whole budget), 25,600 samples counted per
run (common.STACKED_SAMPLES, PacGAN's count; the classifier's calibration rows use the same), the classifier trained 12 epochs. Budget
(estimated, not measured): README's H100 throughput of one process (16.6 G steps/s MaEM DCGAN-64,
17.2 InvertGAN ResNets) puts 5000 steps at ~5 min alone; 21 runs sharing one GPU and 16 cores
perhaps 2-3x slower each, PGMGAN's stages a few minutes more: about 25 minutes of training and
counting, plus machine starts, ~30 minutes in three pieces of `--time-limit 540`. If the first
piece's log.jsonl it_s show otherwise, change --steps (the same for every row) before the runs
reach it. Every piece must see the same --out (a lent machine: calls in a row while it is warm,
the four .gz files carried and named by --data-root). The papers trained far longer: PGMGAN 50K steps of batch 100 on stacked MNIST (Table 1,
with 49K+20K steps of SCAN stages); MaEM-GAN and InvertGAN report no stacked experiment.
"""

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import common  # noqa: E402  (after the path: run as a script from anywhere)

DATASET = "stacked-fashion-mnist"
DATA_ROOT = "/usr/share/datasets/fashion-mnist"          # the Debian package's idx .gz files
SHIM = "invert-gan-run"                                 # argv[1] that runs invert_gan.py on stacked data

# (key, script, label, flags that make the row): each method's baseline first, then the method.
ROWS = [
    ("maem-base", "maem_gan", "MaEM-GAN baseline: L_MaF alone", ["--no-disomap", "--no-dlle", "--no-entropy"]),
    ("maem", "maem_gan", "MaEM-GAN (all terms)", []),
    ("invert-gan", "invert_gan", "InvertGAN baseline: plain GAN", ["--lambda-cons", "0", "--gauss-loss", "none"]),
    ("invert", "invert_gan", "InvertGAN (p-norm)", []),
    ("pgm-gan", "pgm_gan", "PGMGAN baseline: plain GAN (k 1)", ["--k", "1"]),
    ("pgm", "pgm_gan", "PGMGAN (partition + guide)", []),
    ("pgm-partition", "pgm_gan", "Partition GAN (no guide)", ["--guide-weight", "0"]),
]
ROW = {r[0]: r for r in ROWS}

# Sizes. "full" is the GPU plan of the docstring; "tiny" the same table shrunk to run every row on
# a CPU in minutes (not evidence: widths 8-16, a few hundred steps); "smoke" a few steps of each
# stage, for the tests. All values ours (the papers have no stacked Fashion-MNIST runs; sizes chosen
# for the budgets named), except k 200 and n_dis 4 (PGMGAN Table 1 / official config).
SIZES = {
    "full": dict(
        steps=5000, seeds=[0, 1, 2], eval_samples=common.STACKED_SAMPLES, log_every=100, ckpt_every=500,
        classifier=dict(epochs=12, batch_size=128, calibration_samples=common.STACKED_SAMPLES),
        maem_gan=["--arch", "dcgan", "--width", "64", "--z-dim", "64", "--batch-size", "64",
                  "--fig3-samples", "1000"],
        invert_gan=["--arch", "invert-resnet", "--width", "64", "--z-dim", "20", "--batch-size", "64"],
        pgm_gan=["--arch", "dcgan", "--width", "64", "--z-dim", "128", "--batch-size", "64", "--k", "200",
                 "--pretext-steps", "3000", "--pretext-batch-size", "256",
                 "--part-blocks", "8", "--part-width", "64", "--part-steps", "3000",
                 "--part-batch-size", "128"]),
    # A minute or two a run on one busy core: widths 8-16, 150 steps, 2000 samples counted, PGMGAN
    # sampling with 5 redraws instead of 50 (an untrained mixture rejects most draws: the count of
    # the 300-step version took 170 s), the classifier 1 epoch (~88 % test accuracy): enough to
    # exercise every path, not to conclude anything.
    "tiny": dict(
        steps=150, seeds=[0], eval_samples=2000, log_every=50, ckpt_every=50,
        classifier=dict(epochs=1, batch_size=128, calibration_samples=2000),
        maem_gan=["--arch", "dcgan", "--width", "16", "--z-dim", "64", "--batch-size", "32",
                  "--fig3-samples", "64"],
        invert_gan=["--arch", "invert-resnet", "--width", "8", "--z-dim", "20", "--batch-size", "32"],
        pgm_gan=["--arch", "dcgan", "--width", "16", "--z-dim", "128", "--batch-size", "32", "--k", "20",
                 "--pretext-steps", "100", "--pretext-batch-size", "64", "--part-samples", "5000",
                 "--pi-samples", "5000", "--part-blocks", "2", "--part-width", "16",
                 "--part-steps", "100", "--part-batch-size", "64", "--reject-tries", "5"]),
    "smoke": dict(
        steps=2, seeds=[0], eval_samples=64, log_every=1, ckpt_every=2,
        classifier=dict(epochs=4, batch_size=16, calibration_samples=300),
        maem_gan=["--arch", "dcgan", "--width", "4", "--z-dim", "8", "--batch-size", "8", "--m", "4",
                  "--fig3-samples", "8"],
        invert_gan=["--arch", "invert-resnet", "--width", "4", "--z-dim", "4", "--batch-size", "8"],
        pgm_gan=["--arch", "dcgan", "--width", "4", "--z-dim", "8", "--batch-size", "8", "--k", "4",
                 "--n-dis", "1", "--pretext-steps", "2", "--pretext-batch-size", "16", "--proj-dim", "8",
                 "--part-samples", "64", "--pi-samples", "64", "--neighbors", "3", "--part-blocks", "1",
                 "--part-width", "4", "--part-levels", "1", "--part-steps", "2",
                 "--part-batch-size", "16"]),
}
COUNT_SEED = 0          # sampling seed of the count (as evaluate.py ckpt's default): a re-count repeats
GRID = 32               # samples in a row's picture (4 rows of 8 at 32 px: ~270 x 140 px)


# ---------------------------------------------------------------- InvertGAN on stacked data
def invert_gan_run(argv):
    """invert_gan.py's main on stacked-fashion-mnist: its cifar10 preset (32x32x3, App. A.2
    ResNets) registered under this dataset, and no metrics of its own (no Inception offline, no
    --classifier there): this runner counts the modes from ckpt.pt like every other row."""
    import common
    import invert_gan

    invert_gan.PRESETS.setdefault(DATASET, dict(invert_gan.PRESETS["cifar10"]))
    invert_gan.PRESET_SOURCES.setdefault(DATASET, "tests/bench_stacked.py: the cifar10 preset on stacked data")
    invert_gan.final_metrics = lambda *a: {"note": "modes counted by tests/bench_stacked.py (modes.json)"}
    common.run_cli(invert_gan.main, argv)


# ---------------------------------------------------------------- runs and jobs
class Run:
    """One (row, seed): its folder, its command, and whether it is done / counted."""

    def __init__(self, key, seed, args, size, source=None):
        self.key, self.seed = key, seed
        self.script, self.label, self.flags = ROW[key][1], ROW[key][2], ROW[key][3]
        self.name = f"{key}-s{seed}"
        self.out = os.path.join(args.out, self.name)
        self.log = self.out + ".log"
        self.args, self.size = args, size
        self.source = source        # pgm-partition: the PGMGAN run whose stage files it reuses

    def path(self, name):
        return os.path.join(self.out, name)

    def done(self):
        return os.path.isfile(self.path("metrics.json"))

    def ready(self):
        return self.source is None or os.path.isfile(self.source.path("partition.pt"))

    def prepare(self):
        """Whether to pass --resume; clears a folder that holds nothing to continue from."""
        for name in ("modes.json", "grid.png"):          # a run that trains again is counted again
            if os.path.isfile(self.path(name)):
                os.remove(self.path(name))
        stage_files = ("ckpt.pt", "partition.pt", "pretext.pt") if self.script == "pgm_gan" else ("ckpt.pt",)
        if self.source is not None:          # its stage files are copied in: continue only a started GAN
            if not os.path.isfile(self.path("partition.pt")):
                shutil.rmtree(self.out, ignore_errors=True)
                os.makedirs(self.out)
                for name in ("pretext.pt", "partition.pt"):
                    if os.path.isfile(self.source.path(name)):
                        shutil.copy(self.source.path(name), self.path(name))
            return os.path.isfile(self.path("ckpt.pt"))
        resume = any(os.path.isfile(self.path(f)) for f in stage_files)
        if not resume and os.path.isdir(self.out):
            shutil.rmtree(self.out)          # cut off before its first checkpoint: start again
        return resume

    def command(self, resume):
        a, s = self.args, self.size
        steps = a.steps or s["steps"]
        ckpt_every = min(s["ckpt_every"], steps)
        log_every = s["log_every"] if ckpt_every % s["log_every"] == 0 else ckpt_every
        head = ([sys.executable, os.path.abspath(__file__), SHIM] if self.script == "invert_gan"
                else [sys.executable, os.path.join(ROOT, self.script + ".py")])
        cmd = [*head, "--dataset", DATASET, "--data-root", a.data_root, "--device", a.device,
               "--seed", str(self.seed), "--out", self.out, "--steps", str(steps),
               "--log-every", str(log_every), "--ckpt-every", str(ckpt_every), "--sample-every", str(steps),
               *s[self.script], *self.flags]
        if self.script == "pgm_gan":
            cmd += ["--eval-samples", "0"]           # counted here, like every row
            if self.source is not None:
                cmd += ["--stage", "gan"]
        return cmd + (["--resume"] if resume else [])


class ClassifierJob:
    """The mode classifier, trained once as `evaluate.py classifier` would (one job beside the runs)."""

    def __init__(self, path, args, size):
        self.path_, self.args, self.size = path, args, size
        self.name = "classifier"
        self.log = os.path.splitext(path)[0] + ".log"

    def done(self):
        return os.path.isfile(self.path_)          # saved atomically (common.save_mode_classifier)

    def ready(self):
        return True

    def prepare(self):
        return False

    def command(self, resume):
        c = self.size["classifier"]
        return [sys.executable, os.path.join(ROOT, "evaluate.py"), "classifier", "--dataset", "fashion-mnist",
                "--data-root", self.args.data_root, "--out", self.path_, "--epochs", str(c["epochs"]),
                "--batch-size", str(c["batch_size"]), "--calibration-samples", str(c["calibration_samples"]),
                "--device", self.args.device]


def _die_with_parent():
    # A run outlives a killed runner otherwise (a device's timeout kills the runner, not its children).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)       # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(job):
    resume = job.prepare()
    cmd = job.command(resume)
    os.makedirs(os.path.dirname(job.log) or ".", exist_ok=True)
    log = open(job.log, "a")
    print("$ " + " ".join(cmd), flush=True)
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    # One thread per process: many small runs share the cores (and, on a GPU, the device).
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=_die_with_parent)


def stop(running):
    """SIGTERM every running job, then SIGKILL what is left after 30 s."""
    for _, proc in running:
        if proc.poll() is None:
            proc.terminate()
    t0 = time.monotonic()
    for _, proc in running:
        try:
            proc.wait(timeout=max(0.1, 30 - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def schedule(jobs, n_jobs, deadline, on_poll):
    """Run the jobs that are not done, n_jobs at a time, a job only once it is ready;
    on_poll(names of the running jobs) once per poll, after starting what can start (it counts
    finished runs).
    Returns (failed names, names never started because their input is missing, timed out)."""
    todo, running, failed = [j for j in jobs if not j.done()], [], []
    for j in jobs:
        if j.done():
            print(f"done: {j.name} (skipped)", flush=True)
    try:
        while todo or running:
            if deadline is not None and time.monotonic() >= deadline:
                print(f"time limit: stopping {len(running)} job(s); they continue from their last "
                      f"checkpoint next time", flush=True)
                stop(running)
                return failed, [], True
            for job in [j for j in todo if j.ready()]:
                if len(running) >= n_jobs:
                    break
                todo.remove(job)
                running.append((job, launch(job)))
            if not running:                       # what is left waits for a job that failed
                return failed, [j.name for j in todo], False
            on_poll({job.name for job, _ in running})   # after starting: a count leaves no slot idle
            time.sleep(1)
            for item in list(running):
                job, proc = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                print(f"{job.name}: exit {proc.returncode}", flush=True)
                if proc.returncode != 0 or not job.done():
                    failed.append(job.name)
                    print(f"{job.name} failed; the end of {job.log}:\n" + _tail(job.log), flush=True)
    finally:
        stop(running)                              # Ctrl-C / SIGTERM: leave no run behind
    return failed, [], False


def _tail(path, n=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


# ---------------------------------------------------------------- counting
class Counter:
    """Counts finished runs with the calibrated counter; one classifier load per process."""

    def __init__(self, path, device, n):
        self.path, self.device, self.n = os.path.abspath(path), device, n
        self.model = None

    def stale(self, run):
        """True if the run is finished and not counted with this classifier and sample count."""
        if not run.done() or not os.path.isfile(self.path):
            return False
        if not os.path.isfile(run.path("modes.json")):
            return True
        with open(run.path("modes.json")) as f:
            m = json.load(f)
        return (m.get("classifier"), m.get("samples")) != (self.path, self.n)

    def count(self, run):
        import torch

        import common

        if self.model is None:
            self.model = common.load_mode_classifier(self.path, self.device)
        script = importlib.import_module(run.script)
        noise = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(noise):     # PGMGAN's sampler repeats its warning per batch
            sample = script.load_sampler(run.path("ckpt.pt"), self.device)
            torch.manual_seed(COUNT_SEED)
            first = []

            def batches(bs=500):
                for i in range(0, self.n, bs):
                    with torch.no_grad():
                        x = sample(min(bs, self.n - i)).detach().cpu()
                    if not first:
                        first.append(x[:GRID])
                    yield common.to_uint8(x)
            metrics = common.stacked_mode_metrics(batches(), self.model, self.device)
        common.save_image_grid(first[0], run.path("grid.png"), nrow=8)
        warnings = [line for line in noise.getvalue().splitlines() if line.strip()]
        out = dict(metrics, samples=self.n, classifier=self.path, count_seed=COUNT_SEED,
                   count_seconds=round(time.perf_counter() - t0, 1))
        if warnings:
            out["sampler_warning"] = warnings[-1]
        common.write_json(run.path("modes.json"), out)
        kl = "-" if out["reverse_kl"] is None else f"{out['reverse_kl']:.3f}"
        print(f"counted {run.name}: {out['modes']} modes, reverse KL {kl}, counted fraction "
              f"{out['counted_fraction']:.3f} ({self.n} samples, {out['count_seconds']} s)", flush=True)


# ---------------------------------------------------------------- the table
def mean_sd(values):
    """(mean, sample std or None for one value, n) of the values that are numbers."""
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not vals:
        return None, None, 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def cell(values, digits):
    mean, sd, n = mean_sd(values)
    if n == 0:
        return "-"
    text = f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")
    return text if n == len(values) else f"{text} ({n} of {len(values)})"


def table(results, rows, note=""):
    """Markdown table, one line per row: mean ± std over the seeds counted so far.
    results: {row key: [modes.json dicts, one per counted seed]}."""
    lines = ["| row | seeds | modes / 1000 | reverse KL | counted fraction | samples |",
             "|---|---|---|---|---|---|"]
    for key in rows:
        got = results.get(key, [])
        if not got:
            lines.append(f"| {ROW[key][2]} | 0 | - | - | - | - |")
            continue
        lines.append(f"| {ROW[key][2]} | {len(got)} | {cell([m['modes'] for m in got], 1)} | "
                     f"{cell([m['reverse_kl'] for m in got], 3)} | "
                     f"{cell([m['counted_fraction'] for m in got], 3)} | ![{key}](grids/{key}.png) |")
    return (note + "\n\n" if note else "") + "\n".join(lines) + "\n"


def collect(runs, out):
    """{row: [modes.json of each counted seed]}; copies each row's lowest-seed grid to out/grids."""
    results = {}
    for run in sorted(runs, key=lambda r: r.seed):
        if not os.path.isfile(run.path("modes.json")):
            continue
        with open(run.path("modes.json")) as f:
            results.setdefault(run.key, []).append(dict(json.load(f), seed=run.seed))
        grid = os.path.join(out, "grids", f"{run.key}.png")
        if len(results[run.key]) == 1 and os.path.isfile(run.path("grid.png")):
            os.makedirs(os.path.dirname(grid), exist_ok=True)
            shutil.copy(run.path("grid.png"), grid)
    return results


def header(args, size_name, classifier, steps, seeds):
    lines = [f"Stacked Fashion-MNIST, size `{size_name}`: {steps} G steps per run, seeds "
             f"{' '.join(map(str, seeds))}, {args.eval_samples_used} samples counted per run; mean ± std "
             f"over the seeds (sample std). Command: `python tests/bench_stacked.py "
             f"{' '.join(sys.argv[1:])}`."]
    try:
        import torch

        meta = torch.load(classifier, map_location="cpu", weights_only=True)
        rows = ", ".join(f"{r['true_modes']} -> {r['modes']}" for r in meta.get("calibration", []))
        lines.append(f"Mode classifier `{classifier}`: test accuracy {meta.get('test_accuracy', float('nan')):.4f}, "
                     f"threshold {meta.get('threshold')}; calibration (true modes -> counted): {rows}.")
    except (OSError, RuntimeError, KeyError, TypeError, ValueError):
        lines.append(f"Mode classifier `{classifier}`: not available.")
    if size_name != "full":
        lines.append("**Not evidence**: a tiny size (small networks, few steps) and, unless --classifier "
                     "named a trained one, a classifier of few epochs that is not calibrated enough "
                     "for conclusions. It checks the runner, not the methods.")
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="every row at a tiny size (CPU, minutes)")
    size.add_argument("--smoke", action="store_true", help="a few steps of every stage (tests)")
    p.add_argument("--out", default=None, help="folder of the runs and the table (default runs/stacked[-tiny])")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (tiny, smoke: 0)")
    p.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    p.add_argument("--steps", type=int, default=None, help="G steps of every run (default: the size's)")
    p.add_argument("--eval-samples", type=int, default=None, help="samples counted per run (default: the size's)")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes at once (default: all on cuda, where they share the GPU; the CPU count on cpu)")
    p.add_argument("--data-root", default=DATA_ROOT, help="Fashion-MNIST idx files (the four .gz)")
    p.add_argument("--classifier", default=None,
                   help="a trained mode classifier (evaluate.py classifier); default: trained into --out")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which the runs are stopped (resumable) and the table printed")
    p.add_argument("--summary", action="store_true", help="only count finished runs and print the table")
    args = p.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or (args.eval_samples is not None and args.eval_samples < 1):
        p.error("--steps and --eval-samples must be positive")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SHIM]:
        return invert_gan_run(argv[1:])
    args = parse_args(argv)
    size_name = "smoke" if args.smoke else "tiny" if args.tiny else "full"
    size = SIZES[size_name]
    args.out = args.out or os.path.join("runs", "stacked" + ("" if size_name == "full" else f"-{size_name}"))
    args.out = os.path.abspath(args.out)
    args.data_root = os.path.abspath(args.data_root)
    seeds = args.seeds if args.seeds is not None else size["seeds"]
    steps = args.steps or size["steps"]
    args.eval_samples_used = args.eval_samples or size["eval_samples"]
    if not os.path.isdir(args.data_root) and not args.summary:
        sys.exit(f"error: --data-root {args.data_root} is not a folder (Fashion-MNIST's four idx .gz files)")
    if args.classifier and not os.path.isfile(args.classifier):
        sys.exit(f"error: --classifier {args.classifier} does not exist")
    os.makedirs(args.out, exist_ok=True)
    classifier = os.path.abspath(args.classifier or os.path.join(args.out, "fmnist-classifier.pt"))

    runs = []
    for seed in seeds:
        by_key = {}
        for key in args.rows:
            source = by_key.get("pgm") if key == "pgm-partition" else None
            by_key[key] = Run(key, seed, args, size, source)
            runs.append(by_key[key])
    counter = Counter(classifier, args.device, args.eval_samples_used)

    def count_finished(running=()):
        for run in runs:
            if run.name not in running and counter.stale(run):   # a live run may still be writing
                counter.count(run)

    failed, blocked, timed_out = [], [], False
    t0 = time.monotonic()
    if not args.summary:
        # PGMGAN first: its stages come before its GAN, and the Partition GAN waits for them.
        order = sorted(runs, key=lambda r: (r.script != "pgm_gan", r.source is not None))
        jobs = ([] if args.classifier else [ClassifierJob(classifier, args, size)]) + order
        n_jobs = args.jobs or (len(jobs) if args.device == "cuda" else os.cpu_count() or 1)
        deadline = None if args.time_limit is None else t0 + args.time_limit
        print(f"{len(runs)} runs ({len(args.rows)} rows x {len(seeds)} seeds), {steps} G steps each, "
              f"{n_jobs} job(s) at a time on {args.device}, out {args.out}", flush=True)
        # SIGTERM (a scheduler, a device timeout) stops the runs cleanly, as Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        failed, blocked, timed_out = schedule(jobs, n_jobs, deadline, count_finished)
    count_finished()
    results = collect(runs, args.out)
    note = header(args, size_name, classifier, steps, seeds)
    text = table(results, args.rows, note)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"size": size_name, "steps": steps, "seeds": seeds, "rows": args.rows,
                   "classifier": classifier, "results": results}, f, indent=2, sort_keys=True)
        f.write("\n")
    print("\n" + text, flush=True)
    missing = [r.name for r in runs if not os.path.isfile(r.path("modes.json"))]
    print(f"wall time {time.monotonic() - t0:.0f} s; {len(runs) - len(missing)} of {len(runs)} runs counted",
          flush=True)
    if failed or blocked:
        print(f"failed: {' '.join(failed) or '-'}; not started (input missing): {' '.join(blocked) or '-'}",
              flush=True)
        return 1
    if timed_out or (missing and not args.summary):
        print("not finished: run the same command again to continue", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
