"""The reduced-discriminator stacked benchmark (PacGAN Table 3, after Unrolled GAN), on the CPU.

    # the protocol's DCGAN as a minimal loop: the table's DCGAN row and the speed floor
    OMP_NUM_THREADS=1 python tests/bench_pacgan.py floor --out runs/pacgan/dcgan-d2-s0 --steps 100000
    # count every kept generator of a run (the budget curve), with a mode classifier
    python tests/bench_pacgan.py curve --out runs/pacgan/dcgan-d2-s0 --classifier runs/classifier.pt

The protocol (fjxmlzn/PacGAN, stacked_MNIST_experiments/unrolled_GAN_experiment/D=0.25G, model.py):
each sample stacks three training images drawn at random (with replacement, independently) as R, G,
B, in [-1, 1]; z ~ N(0, I_256); G and D are common.PacGANGenerator / PacGANDiscriminator (D at 1/4
of G: width 2; at 1/2: width 4); BCE on D's logit with the non-saturating G loss; each iteration
one D step on a fresh real batch and G(z), then one G step on the same z; Adam betas (0.5, 0.99),
lr 2e-4 for D and 1e-4 for G; batch 128. Both nets stay in training mode throughout, as in the
TensorFlow original (its batch_norm always normalises with the batch's statistics), so the sampler
also uses batch statistics. We run it on stacked Fashion-MNIST (MNIST is not available offline).

`floor` is that loop and nothing else: no logging beyond a line every --log-every steps, a resumable
checkpoint (ckpt.pt) and a copy of G (g_<step>.pt) every --ckpt-every steps, so the mode count can be
redone on every kept G later with whatever counter is current. A killed run continues from ckpt.pt.

`table` runs the table's rows (TABLE_ROWS), --seeds each, --steps G steps each (the same budget for
every row; default 15K, README), at D = 1/2 (--d-width 4, the default) or 1/4 (2), --jobs at a time
(each `OMP_NUM_THREADS=1 nice`):
    dcgan     the floor loop above: the protocol as published
    maem      maem_gan.py --arch pacgan, all terms
    maem-maf  maem_gan.py --arch pacgan --no-disomap --no-dlle --no-entropy (m-dim D, no MaEM term)
    invert    invert_gan.py --arch pacgan (p-norm L_Gau, F sized like G)
    pgm       pgm_gan.py --arch pacgan (k 200, CPU-sized stages: its preset)
Checkpoints stay in --out (outside the repository). Each finished run is counted the same way for
every row: its G (the floor's ckpt.pt; a script's load_sampler) on 25,600 samples of one fixed z
set (torch seed COUNT_Z_SEED; G's BN on batch statistics in batches of 128) by
common.stacked_mode_metrics; one small JSON and a 10x10 grid per run go to --results (default
tests/results/stacked-pacgan/, in the repository): a run with a result there is done and skipped,
on any machine. A cut run continues (the floor from its ckpt.pt, a script with --resume);
--time-limit S stops the runs (resumable) after S seconds and exits 3. `--summary` writes the
markdown table of the results (summary.md). `speed` times each row's G steps against the floor's.

    python tests/bench_pacgan.py table --classifier CLF --rows dcgan invert --jobs 2 --time-limit 3600
    python tests/bench_pacgan.py table --summary
    python tests/bench_pacgan.py speed --rows dcgan invert pgm
"""

import argparse
import hashlib
import importlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import common  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
import bench_stacked  # noqa: E402  (its job scheduler: schedule / stop)

# The protocol's constants: PacGAN model.py / config.py (D=0.25G), also in the summary.
Z_DIM, BATCH, LR_D, LR_G, BETAS = 256, 128, 2e-4, 1e-4, (0.5, 0.99)
COUNT_N = 25_600        # PacGAN config.py's num_test_sample: samples per count, one fixed z set
COUNT_Z_SEED = 4321     # ours: the fixed z set of every count


def load_train_images(root):
    images, _ = common.load_mnist_like("fashion-mnist", root, split="train")
    return images[:, 0].contiguous()                              # (60000, 28, 28) uint8


def stacked_batch(images, n, gen):
    """n stacked samples: three independent uniform draws from the training images per sample."""
    idx = torch.randint(0, images.shape[0], (n, 3), generator=gen)
    return images[idx].float().div_(127.5).sub_(1.0)              # (n, 3, 28, 28) in [-1, 1]


def build(d_width, seed):
    torch.manual_seed(seed)
    G = common.build_generator("pacgan", Z_DIM, 28, 3)
    D = common.build_discriminator("pacgan", 28, 3, width=d_width)
    opt_g = torch.optim.Adam(G.parameters(), lr=LR_G, betas=BETAS)
    opt_d = torch.optim.Adam(D.parameters(), lr=LR_D, betas=BETAS)
    return G, D, opt_g, opt_d


def floor(args):
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    images = load_train_images(args.data_root)
    G, D, opt_g, opt_d = build(args.d_width, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, seconds = 0, 0.0
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        for obj, key in ((G, "G"), (D, "D"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            obj.load_state_dict(ck[key])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        step, seconds = ck["step"], ck["seconds"]
        print(f"resumed at step {step}", flush=True)
    else:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ones = torch.ones(BATCH, 1)
    zeros = torch.zeros(BATCH, 1)
    bce = F.binary_cross_entropy_with_logits
    t0, s0 = time.time(), step
    log = open(os.path.join(args.out, "log.jsonl"), "a")
    while step < args.steps and not stop:
        x = stacked_batch(images, BATCH, gen)
        z = torch.randn(BATCH, Z_DIM, generator=gen)
        # D step: real batch and G(z), each through D on its own (BN statistics per batch).
        fake = G(z)
        d_loss = bce(D(x), ones) + bce(D(fake.detach()), zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # G step on the same z, against the updated D (non-saturating loss). G is unchanged since
        # `fake` was drawn and its BN uses batch statistics, so G(z) again would equal `fake`: reuse it.
        if getattr(args, "fresh_z", False):    # speed only: the method scripts' G step, on a fresh z
            fake = G(torch.randn(BATCH, Z_DIM, generator=gen))
        g_loss = bce(D(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        step += 1
        if step % args.log_every == 0:
            now = time.time()
            rate = (step - s0) / (now - t0)
            rec = dict(step=step, d_loss=d_loss.item(), g_loss=g_loss.item(), it_s=rate)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if step % args.ckpt_every == 0 or step == args.steps or stop:
            save(args, ckpt_path, G, D, opt_g, opt_d, gen, step, seconds + time.time() - t0)
    save(args, ckpt_path, G, D, opt_g, opt_d, gen, step, seconds + time.time() - t0)
    print(f"stopped at step {step}" if stop else f"finished {step} steps", flush=True)


def save(args, path, G, D, opt_g, opt_d, gen, step, seconds):
    state = dict(G=G.state_dict(), D=D.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                 gen=gen.get_state(), torch_rng=torch.get_rng_state(), step=step, seconds=seconds,
                 d_width=args.d_width, seed=args.seed)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    if step % args.ckpt_every == 0:
        g_path = os.path.join(args.out, f"g_{step:06d}.pt")
        torch.save(dict(G=G.state_dict(), step=step, seconds=seconds), g_path + ".tmp")
        os.replace(g_path + ".tmp", g_path)


@torch.no_grad()
def draw(G, n=COUNT_N, seed=COUNT_Z_SEED, batch=BATCH):
    """n samples of G from one fixed z set, in batches of the protocol's 128 with G's BN on each
    batch's statistics (PacGAN's sampler: its batch_norm never leaves training mode)."""
    z = torch.randn(n, Z_DIM, generator=torch.Generator().manual_seed(seed))
    return common.sample_bn_batch(G, z, batch=batch)


def load_g(path):
    G = common.build_generator("pacgan", Z_DIM, 28, 3)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    G.load_state_dict(ck["G"])
    return G, ck


def count(G, classifier, n=COUNT_N):
    """Both counts of PacGAN's Table 3 protocol on n (COUNT_N) samples: the raw argmax count and the
    project's calibrated one (common.stacked_mode_metrics)."""
    x = draw(G, n=n)
    return common.stacked_mode_metrics(x, classifier), x


def curve(args):
    """Count every kept G of a run (g_<step>.pt) with the classifier into curve.json, rewritten after
    each count; steps already counted there with the same classifier file (SHA-256) are kept."""
    classifier = common.load_mode_classifier(args.classifier)
    sha = common.file_sha256(args.classifier)
    path = os.path.join(args.out, "curve.json")
    done = {}
    if os.path.isfile(path):
        done = {r["step"]: r for r in json.load(open(path))["rows"]
                if r.get("protocol", {}).get("classifier_sha256") == sha and r["protocol"].get("samples") == args.count_samples}
    files = sorted(f for f in os.listdir(args.out) if f.startswith("g_") and f.endswith(".pt"))
    for name in files:
        step = int(name[2:-3])
        if step in done or step % args.every:
            continue
        G, ck = load_g(os.path.join(args.out, name))
        m, x = count(G, classifier, args.count_samples)
        done[step] = dict(step=ck["step"], seconds=round(ck["seconds"], 1), **m)
        print(json.dumps(done[step]), flush=True)
        common.save_image_grid(x[:100], os.path.join(args.out, name.replace(".pt", ".png")), nrow=10)
        common.write_json(path, dict(classifier=args.classifier, n=args.count_samples, z_seed=COUNT_Z_SEED,
                                     rows=[done[k] for k in sorted(done)]))
    if args.results:
        export_curve(args, [done[k] for k in sorted(done)], sha)


def export_curve(args, rows, sha):
    """The repository's copy of a floor run's curve (--results): its flags, the classifier, and per
    kept G both counts beside the D loss logged nearest that step (2 ln 2 = 1.386: D at chance)."""
    run = json.load(open(os.path.join(args.out, "args.json")))
    logged = {}
    if os.path.isfile(os.path.join(args.out, "log.jsonl")):
        logged = {r["step"]: r["d_loss"] for r in map(json.loads, open(os.path.join(args.out, "log.jsonl")))}
    ck = torch.load(os.path.join(args.out, "ckpt.pt"), map_location="cpu", weights_only=False)
    keep = ("step", "seconds", "modes_raw", "kl_raw", "modes", "reverse_kl", "counted_fraction")
    out = [dict({k: r.get(k) for k in keep}, d_loss=logged.get(r["step"])) for r in rows]
    os.makedirs(args.results, exist_ok=True)
    common.write_json(os.path.join(args.results, f"dcgan-d{run['d_width']}-s{run['seed']}-curve.json"), dict(
        row="dcgan", d_width=run["d_width"], seed=run["seed"], dataset=DATASET, trained_steps=ck["step"],
        command=f"OMP_NUM_THREADS=1 python tests/bench_pacgan.py floor --out RUN --steps {run['steps']} "
                f"--seed {run['seed']} --d-width {run['d_width']}; python tests/bench_pacgan.py curve --out RUN "
                f"--classifier CLF --results {os.path.relpath(args.results, ROOT)}",
        classifier_sha256=sha, classifier_test_accuracy=classifier_info(args.classifier)[1],
        samples=args.count_samples, z_seed=COUNT_Z_SEED, commit=git_commit(), rows=out))


# ---------------------------------------------------------------- the table: rows, runs, counts
DATASET = "stacked-fashion-mnist"      # the protocol on Fashion-MNIST (MNIST is not offline)
RESULTS = os.path.join(TESTS, "results", "stacked-pacgan")
# row -> (script, label, flags). Every row: --arch pacgan, the script's (dataset, "pacgan") preset.
TABLE_ROWS = {
    "dcgan": ("floor", "DCGAN (PacGAN's protocol)", []),
    "maem": ("maem_gan", "MaEM-GAN (all terms)", []),
    "maem-maf": ("maem_gan", "MaEM-GAN, m-dim D, no MaEM term (BCE)", ["--no-disomap", "--no-dlle", "--no-entropy"]),
    "invert": ("invert_gan", "InvertGAN (p-norm)", []),
    "pgm": ("pgm_gan", "PGMGAN (k 200, guide)", []),
}
# Rows that only `speed` times. One partition makes pgm_gan.py a plain GAN on the protocol's networks
# (its D head adds 256 weights), so this row is the DCGAN through a method script: the scripts' overhead.
SPEED_ROWS = {
    "dcgan-script": ("pgm_gan", "DCGAN through pgm_gan.py --k 1", ["--k", "1"]),
    # The floor with the scripts' algorithm (a fresh z and a second G forward for the G step):
    # dcgan-script over this row is the scripts' overhead, this row over the floor the algorithm's.
    "dcgan-fresh-z": ("floor", "the floor loop, G step on a fresh z", ["--fresh-z"]),
}
# Extra flags per script for a smoke run (tests only: small batch and stages, not evidence).
SMOKE = {
    "maem_gan": ["--batch-size", "16", "--m", "4"],
    "invert_gan": ["--batch-size", "16"],
    "pgm_gan": ["--batch-size", "16", "--k", "4", "--pretext-steps", "2", "--pretext-batch-size", "32",
                "--part-samples", "200", "--pi-samples", "200", "--part-steps", "2", "--part-batch-size", "32",
                "--reject-tries", "2"],
}
RESULT_FIELDS = ("row", "seed", "d_width", "steps", "modes_raw", "kl_raw", "modes", "reverse_kl",
                 "counted_fraction", "samples", "classifier", "classifier_sha256", "classifier_test_accuracy",
                 "train_seconds", "it_s", "commit", "dataset", "command")


def git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except OSError:
        return None


class TableRun:
    """One (row, d_width, seed) at --steps: its folder in --out, its result in --results."""

    def __init__(self, row, seed, args):
        self.row, self.seed, self.args = row, seed, args
        self.script, self.label, self.flags = {**TABLE_ROWS, **SPEED_ROWS}[row]
        self.name = f"{row}-d{args.d_width}-n{args.steps}-s{seed}"
        self.out = os.path.join(args.out, self.name)
        self.log = self.out + ".log"
        self.result = os.path.join(args.results, self.name + ".json")

    def path(self, name):
        return os.path.join(self.out, name)

    def trained(self):
        if self.script != "floor":
            return os.path.isfile(self.path("metrics.json"))
        path = self.path("ckpt.pt")
        if not os.path.isfile(path):
            return False
        stamp = os.stat(path).st_mtime_ns                 # polled every second: read a new file only
        if getattr(self, "_stamp", None) != stamp:
            self._stamp = stamp
            self._done = torch.load(path, map_location="cpu", weights_only=False)["step"] >= self.args.steps
        return self._done

    def done(self):                     # bench_stacked.schedule: nothing to train
        return os.path.isfile(self.result) or self.trained()

    def ready(self):
        return True

    def prepare(self):
        """--resume where there is something to continue from; else a clean folder."""
        keep = ("ckpt.pt", "pretext.pt", "partition.pt")
        resume = any(os.path.isfile(self.path(f)) for f in keep)
        if not resume and os.path.isdir(self.out):
            shutil.rmtree(self.out)
        return resume

    def command(self, resume):
        a = self.args
        every = min(a.ckpt_every, a.steps)
        log_every = min(a.log_every, every) if every % min(a.log_every, every) == 0 else every
        head = ["nice", sys.executable]
        if self.script == "floor":         # resumes from its own ckpt.pt
            return head + [os.path.abspath(__file__), "floor", "--out", self.out, "--steps", str(a.steps),
                           "--seed", str(self.seed), "--d-width", str(a.d_width), "--data-root", a.data_root,
                           "--ckpt-every", str(every), "--log-every", str(log_every)] + self.flags
        cmd = head + [os.path.join(ROOT, self.script + ".py"), "--dataset", DATASET, "--arch", "pacgan",
                      "--data-root", a.data_root, "--device", "cpu", "--seed", str(self.seed), "--out", self.out,
                      "--steps", str(a.steps), "--d-width", str(a.d_width), "--log-every", str(log_every),
                      "--ckpt-every", str(every), "--sample-every", str(a.steps)]
        if self.script == "pgm_gan":       # counted here (invert_gan and maem_gan, with no --classifier, skip theirs)
            cmd += ["--eval-samples", "0"]
        cmd += (SMOKE[self.script] if a.smoke else []) + self.flags
        return cmd + (["--resume"] if resume else [])

    def sampler(self):
        """(n -> n samples, train_seconds) of the finished run: G's BN on batch statistics in batches of 128."""
        if self.script == "floor":
            G, ck = load_g(self.path("ckpt.pt"))
            return (lambda n: draw(G, n)), ck["seconds"]
        script = importlib.import_module(self.script)
        sample = script.load_sampler(self.path("ckpt.pt"), "cpu")
        ck = common.load_checkpoint(self.path("ckpt.pt"))
        return sample, common.saved_seconds(ck)

    def it_s(self, seconds):
        """G steps per second of training: the mean of log.jsonl's intervals (the scripts; PGMGAN's
        stages excluded), else steps / train_seconds (the floor)."""
        path = self.path("log.jsonl")
        if self.script != "floor" and os.path.isfile(path):
            recs = [json.loads(line) for line in open(path) if line.strip()]
            steps = [0] + [r["step"] for r in recs]
            t = sum((b - a) / r["it_s"] for a, b, r in zip(steps, steps[1:], recs) if r.get("it_s"))
            if t > 0:
                return steps[-1] / t
        return self.args.steps / seconds if seconds else None


def classifier_info(path):
    meta = torch.load(path, map_location="cpu", weights_only=False)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return sha, meta.get("test_accuracy")


def count_run(run, classifier, info, command):
    """Count a finished run (COUNT_N samples, fixed z) and write its JSON and 10x10 grid."""
    sample, seconds = run.sampler()
    n = run.args.count_samples
    torch.manual_seed(COUNT_Z_SEED)           # the scripts' samplers draw z (all n at once) from it
    t0 = time.perf_counter()
    with torch.no_grad():
        x = sample(n).detach().float().cpu()
    m = common.stacked_mode_metrics(x, classifier)
    rec = dict(row=run.row, seed=run.seed, d_width=run.args.d_width, steps=run.args.steps,
               modes_raw=m.get("modes_raw"), kl_raw=m.get("kl_raw"), modes=m["modes"],
               reverse_kl=m["reverse_kl"], counted_fraction=m["counted_fraction"], samples=n,
               z_seed=COUNT_Z_SEED, classifier=os.path.basename(run.args.classifier),
               classifier_sha256=info[0], classifier_test_accuracy=info[1], train_seconds=round(seconds, 1),
               it_s=run.it_s(seconds), commit=git_commit(), dataset=DATASET, command=command,
               count_seconds=round(time.perf_counter() - t0, 1))
    if "non_finite" in m:
        rec["non_finite"] = m["non_finite"]
    os.makedirs(run.args.results, exist_ok=True)
    common.save_image_grid(x[:100], run.result[:-5] + ".png", nrow=10)
    common.write_json(run.result, rec)
    print(f"counted {run.name}: {rec['modes_raw']} raw / {rec['modes']} calibrated modes, KL raw "
          f"{rec['kl_raw']}, train {rec['train_seconds']} s", flush=True)
    return rec


def load_results(folder):
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and name != "summary.json" and not name.endswith("-curve.json"):   # curve: floor's counts
            with open(os.path.join(folder, name)) as f:
                out.append(json.load(f))
    return out


def _cell(values, digits):
    vals = [v for v in values if isinstance(v, (int, float))]
    if not vals:
        return "-"
    text = f"{statistics.mean(vals):.{digits}f}" + (f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else "")
    return text + ("" if len(vals) == len(values) else f" ({len(vals)} of {len(values)})")


def summary_table(results):
    """Markdown: one line per (row, D width, steps), mean ± sample std over seeds and the per-seed values."""
    lines = ["Stacked **Fashion-MNIST** (PacGAN's Table 3 protocol); 25,600 samples per run; mean ± std over seeds.",
             "",
             "| row | D | steps | seeds | modes raw (PacGAN) | KL raw | modes calibrated | KL calibrated | "
             "counted fraction | per-seed raw modes | CPU h / run | it/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in results:
        groups.setdefault((r["row"], r["d_width"], r["steps"]), []).append(r)
    order = list(TABLE_ROWS)
    for (row, w, steps), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], order.index(kv[0][0])
                                                                      if kv[0][0] in order else 99)):
        rs = sorted(rs, key=lambda r: r["seed"])
        per_seed = ", ".join(f"s{r['seed']}: {r['modes_raw']}" for r in rs)
        hours = _cell([r["train_seconds"] / 3600 for r in rs], 2)
        lines.append(f"| {TABLE_ROWS.get(row, (None, row))[1]} | 1/{8 // w if w in (2, 4) else w} | {steps} | "
                     f"{len(rs)} | {_cell([r['modes_raw'] for r in rs], 1)} | {_cell([r['kl_raw'] for r in rs], 2)} | "
                     f"{_cell([r['modes'] for r in rs], 1)} | {_cell([r['reverse_kl'] for r in rs], 2)} | "
                     f"{_cell([r['counted_fraction'] for r in rs], 3)} | {per_seed} | {hours} | "
                     f"{_cell([r['it_s'] for r in rs], 1)} |")
    accs = sorted({(r.get("classifier_sha256", "")[:12], r.get("classifier_test_accuracy")) for r in results})
    lines += ["", "Classifier (SHA-256 prefix, test accuracy): " + "; ".join(f"{s} {a}" for s, a in accs)]
    return "\n".join(lines) + "\n"


def table(args):
    args.out, args.results = os.path.abspath(args.out), os.path.abspath(args.results)
    args.data_root = os.path.abspath(args.data_root)
    if args.summary:
        text = summary_table(load_results(args.results))
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "summary.md"), "w") as f:
            f.write(text)
        print(text, flush=True)
        return 0
    if not args.classifier or not os.path.isfile(args.classifier):
        raise SystemExit("error: --classifier FILE (evaluate.py classifier --dataset fashion-mnist) is required")
    classifier = common.load_mode_classifier(args.classifier)
    info = classifier_info(args.classifier)
    runs = [TableRun(row, seed, args) for seed in args.seeds for row in args.rows]
    os.makedirs(args.out, exist_ok=True)
    commands = {}

    def count_finished(running=()):
        for run in runs:
            if run.name not in running and not os.path.isfile(run.result) and run.trained():
                count_run(run, classifier, info, commands.get(run.name) or " ".join(run.command(False)[1:]))

    for run in runs:
        commands[run.name] = " ".join(["python"] + run.command(False)[2:])
    print(f"{len(runs)} runs ({len(args.rows)} rows x {len(args.seeds)} seeds), {args.steps} G steps, D width "
          f"{args.d_width}, {args.jobs} at a time, out {args.out}, results {args.results}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    failed, _, timed_out = bench_stacked.schedule(runs, args.jobs, deadline, count_finished)
    count_finished()
    missing = [r.name for r in runs if not os.path.isfile(r.result)]
    print(summary_table([r for r in load_results(args.results) if r["steps"] == args.steps
                         and r["d_width"] == args.d_width]), flush=True)
    if failed:
        print(f"failed: {' '.join(failed)}", flush=True)
        return 1
    if timed_out or missing:
        print(f"not finished ({len(missing)} runs): run the same command again to continue", flush=True)
        return 3
    return 0


# ---------------------------------------------------------------- speed: each row against the floor
def _interval_seconds(path, start, floor):
    """Seconds between G step `start` and the log's last step: from the floor's cumulative rate, or
    the scripts' per-interval it_s."""
    recs = [json.loads(line) for line in open(path) if line.strip()]
    if floor:                                       # it_s = step / seconds since the process started
        t = {r["step"]: r["step"] / r["it_s"] for r in recs}
        return t[recs[-1]["step"]] - t[start], recs[-1]["step"] - start
    steps = [0] + [r["step"] for r in recs]
    t = sum((b - a) / r["it_s"] for a, b, r in zip(steps, steps[1:], recs) if a >= start)
    return t, recs[-1]["step"] - start


def speed_table(rows, rates, floors, repeat):
    """The markdown of `speed`: per row, the medians over the rounds of its G steps/s and of the floor's
    timed just before it, and the median of the per-round ratios floor rate / row rate (= row step
    time / floor step time); a round where either run failed (None) is left out."""
    lines = [f"| row | G steps/s (median of {repeat}) | floor steps/s | step time, row / floor (median) "
             "| every round's ratio |", "|---|---|---|---|---|"]
    for row in rows:
        pairs = [(r, f) for r, f in zip(rates[row], floors[row]) if r and f]
        if not pairs:
            lines.append(f"| {row} | - | - | - | - |")
            continue
        ratios = [f / r for r, f in pairs]
        lines.append(f"| {row} | {statistics.median(r for r, _ in pairs):.2f} | "
                     f"{statistics.median(f for _, f in pairs):.2f} | {statistics.median(ratios):.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in ratios)} |")
    return "\n".join(lines) + "\n"


def speed(args):
    """Each row's G steps/s on one core, the floor loop timed just before it (same networks and
    losses, same machine state), after --warmup steps; --repeat rounds over the rows, interleaved;
    prints each row's median rate and median ratio of step time to the floor's (every ratio beside)."""
    args.out, args.data_root = os.path.abspath(args.out), os.path.abspath(args.data_root)
    total = args.warmup + args.steps
    stages = ["--pretext-steps", "10", "--part-steps", "10", "--part-samples", "2000", "--pi-samples", "2000"]
    rates = {row: [] for row in args.rows}
    floors = {row: [] for row in args.rows}
    for round_ in range(args.repeat):
        for row in args.rows:
            for which in ("dcgan", row) if row != "dcgan" else ("dcgan",):
                os.makedirs(args.out, exist_ok=True)
                ns = argparse.Namespace(out=args.out, results=args.out, steps=total, count_samples=COUNT_N,
                                        d_width=args.d_width, data_root=args.data_root, ckpt_every=total,
                                        log_every=args.warmup, smoke=False)
                run = TableRun(which, 0, ns)
                shutil.rmtree(run.out, ignore_errors=True)
                cmd = run.command(False) + (stages if run.script == "pgm_gan" else [])
                env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
                with open(run.log, "w") as log:
                    rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if rc != 0:
                    print(f"{which}: exit {rc}, see {run.log}", flush=True)
                    rate = None
                else:
                    seconds, n = _interval_seconds(run.path("log.jsonl"), args.warmup, run.script == "floor")
                    rate = n / seconds
                    print(f"round {round_ + 1}: {which}: {rate:.2f} G steps/s over {n} steps after "
                          f"{args.warmup}", flush=True)
                (floors if which == "dcgan" else rates)[row].append(rate)
            if row == "dcgan":
                rates[row] = floors[row]
    text = speed_table(args.rows, rates, floors, args.repeat)
    print(text, flush=True)
    with open(os.path.join(args.out, "speed.md"), "w") as fh:
        fh.write(text)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("floor", help="the protocol's DCGAN as a minimal loop")
    f.add_argument("--out", required=True)
    f.add_argument("--steps", type=int, default=100_000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--d-width", type=int, default=2, help="2: D = 1/4 G (585 parameters); 4: D = 1/2 G")
    f.add_argument("--ckpt-every", type=int, default=5000)
    f.add_argument("--log-every", type=int, default=500)
    f.add_argument("--data-root", default=common.FASHION_MNIST_SYSTEM_DIR)
    f.add_argument("--fresh-z", action="store_true",
                   help="speed only, not the protocol: the G step on a fresh z (G forward again), as the method scripts do")
    c = sub.add_parser("curve", help="count every kept G of a run")
    c.add_argument("--out", required=True)
    c.add_argument("--classifier", required=True)
    c.add_argument("--count-samples", type=int, default=COUNT_N, help=argparse.SUPPRESS)   # tests: fewer
    c.add_argument("--results", default=None, help="also write the repository's copy, DIR/dcgan-d<w>-s<seed>-curve.json")
    c.add_argument("--every", type=int, default=1, help="count only the kept Gs whose step is a multiple of this")
    t = sub.add_parser("table", help="the table's runs: train, resume, count, keep results in the repository")
    t.add_argument("--rows", nargs="+", default=list(TABLE_ROWS), choices=list(TABLE_ROWS))
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--steps", type=int, default=15_000,
                   help="G steps of every run, the same for every row (ours: 15000, from the DCGAN curve, README; "
                        "PacGAN: 500K)")
    t.add_argument("--d-width", type=int, default=4, choices=[2, 4],
                   help="2: D = 1/4 G (585 parameters); 4 (ours, default: the 1/4 DCGAN draws no items, README): D = 1/2 G")
    t.add_argument("--jobs", type=int, default=2, help="runs at a time, each OMP_NUM_THREADS=1 nice")
    t.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which the runs stop (resumable; exit 3); the same command continues")
    t.add_argument("--classifier", default=None, help="the mode classifier (evaluate.py classifier --dataset fashion-mnist)")
    t.add_argument("--out", default="/work/bench-runs/pacgan", help="checkpoints and logs (outside the repository)")
    t.add_argument("--results", default=RESULTS, help="per-run JSON + grid (default: tests/results/stacked-pacgan)")
    t.add_argument("--data-root", default=common.FASHION_MNIST_SYSTEM_DIR)
    t.add_argument("--ckpt-every", type=int, default=5000)
    t.add_argument("--log-every", type=int, default=500)
    t.add_argument("--summary", action="store_true", help="only write and print the table of --results")
    t.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)     # tests: small batches and stages
    t.add_argument("--count-samples", type=int, default=COUNT_N, help=argparse.SUPPRESS)   # tests: fewer
    s = sub.add_parser("speed", help="each row's G steps/s on one core against the floor loop's")
    s.add_argument("--rows", nargs="+", default=list(TABLE_ROWS) + list(SPEED_ROWS),
                   choices=list(TABLE_ROWS) + list(SPEED_ROWS))
    s.add_argument("--steps", type=int, default=300, help="timed G steps after the warm-up")
    s.add_argument("--warmup", type=int, default=50)
    s.add_argument("--repeat", type=int, default=1, help="rounds over the rows (interleaved); medians reported")
    s.add_argument("--d-width", type=int, default=4, choices=[2, 4])
    s.add_argument("--out", default="/work/bench-runs/pacgan-speed")
    s.add_argument("--data-root", default=common.FASHION_MNIST_SYSTEM_DIR)
    args = p.parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        p.error("--steps must be positive")
    return {"floor": floor, "curve": curve, "table": table, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
