"""Benchmarks of maem_gan.py (not collected by pytest: the file name does not start with test_).

Every number comes from running the real script in a subprocess and reading what it writes
(log.jsonl's it/s, metrics.json), so the benchmark measures exactly what a user runs.

    python tests/bench_maem.py cost      # ms per training step: full MaEM-GAN vs L_MaF alone
    python tests/bench_maem.py toy --seeds 0 1 2 3 4 --jobs 2   # ring, grid: modes, quality, reverse KL, health
    python tests/bench_maem.py toy --rows preset baseline --seeds 0 1 2 3 4 --keep runs/2d-maem --results tests/results/2d
                                         # the preset beside its no-term baseline, bench_2d.py's columns
                                         # (--rows image-setting: L_MaF + spectral norm on D)
    python tests/bench_maem.py ablation2d --seeds 0 1 2 --jobs 2  # the ablation rows on the grid
    python tests/bench_maem.py ablation  # the ablation rows on stacked Fashion-MNIST: modes / 1000, reverse KL

Set OMP_NUM_THREADS yourself (1 on a shared CPU). `--json FILE` writes the results; `--keep DIR`
keeps the runs (default: a temporary folder). Extra flags after `--` go to every maem_gan.py run;
with --results they (or --steps) need `--tag T`, which names the result files' row (preset-T) and
the run folders, e.g. `toy --rows preset --tag nc3 --results tests/results/2d -- --n-critic 3`.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Table 1's rows: the baseline is the m-dim D trained with the preset's adversarial loss alone
# (L_MaF on images, the non-saturating loss on 2-D data); each row adds terms.
ABLATION_ROWS = [
    ("baseline (adversarial loss)", ["--no-disomap", "--no-dlle", "--no-entropy"]),
    ("+DIsoMap", ["--no-dlle", "--no-entropy"]),
    ("+DIsoMap +DLLE", ["--no-entropy"]),
    ("+DIsoMap +RB-MaEM", ["--no-dlle"]),
    ("all (MaEM-GAN)", []),
]
BASELINE = ABLATION_ROWS[0][1]


def run(flags, out, quiet=True):
    """Run maem_gan.py with `flags` into `out`; return (wall seconds, log lines, metrics)."""
    cmd = [sys.executable, os.path.join(ROOT, "maem_gan.py"), *flags, "--out", out]
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=quiet, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}): {(proc.stderr or '')[-2000:]}")
    lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    metrics_path = os.path.join(out, "metrics.json")
    metrics = json.load(open(metrics_path)) if os.path.isfile(metrics_path) else {}
    return wall, lines, metrics


def cost(args, workdir, extra):
    """Time per G step (n_critic D steps + 1 G step) of the full method and of the L_MaF baseline,
    same backbone, batch and data. it/s is log.jsonl's rate between two log steps; the first log
    interval (start-up, allocator warm-up) is dropped. Runs alternate (base, full, base, full...) so
    a change in the machine's load hits both alike."""
    flags = ["--dataset", args.dataset, "--steps", str(args.steps), "--log-every", str(args.log_every),
             "--ckpt-every", str(args.steps), "--sample-every", str(args.steps), "--fig3-samples", "100",
             "--eval-samples", "100", "--batch-size", str(args.batch_size), "--device", args.device, *extra]
    times = {"baseline": [], "full": []}
    for rep in range(args.repeats):
        for name, more in (("baseline", BASELINE), ("full", [])):
            out = os.path.join(workdir, f"cost-{name}-{rep}")
            _, lines, _ = run(flags + more, out)
            times[name] += [1000.0 / x["it_s"] for x in lines[1:]]
    ms = {k: sum(v) / len(v) for k, v in times.items()}
    result = {"dataset": args.dataset, "batch_size": args.batch_size, "steps_per_run": args.steps,
              "repeats": args.repeats, "ms_per_step_baseline": round(ms["baseline"], 2),
              "ms_per_step_full": round(ms["full"], 2), "ratio": round(ms["full"] / ms["baseline"], 3),
              "samples_ms_baseline": [round(t, 1) for t in times["baseline"]],
              "samples_ms_full": [round(t, 1) for t in times["full"]]}
    print(f"\n{'run':<12}{'ms/step':>10}\nbaseline    {ms['baseline']:>10.1f}\nfull        "
          f"{ms['full']:>10.1f}\nratio full/baseline: {result['ratio']:.2f} (target <= 2)")
    return result


# What a 2-D row reports: bench_2d.HEAD's columns (metrics.json's mode and within-mode figures),
# then the health figures of D's codes (metrics.json) and of the last log line.
TOY_COLUMNS = [("real_cos_nn", "cos_nn (real)"), ("real_cos_batch", "cos_batch (real)"),
               ("code_cos_modes_mean", "mode-code cos"), ("code_cos_modes_centred_mean", "centred"),
               ("code_dims", "code dims")]


def health_of(ckpt_path):
    """maem_gan.code_directions of a checkpoint's final D."""
    import common
    import maem_gan

    ckpt = common.load_checkpoint(ckpt_path, method="maem_gan")
    args = argparse.Namespace(**ckpt["args"])
    _, D = maem_gan.build_networks(args, 2)
    D.load_state_dict(ckpt["D"])
    return maem_gan.code_directions(D, args, "cpu")


def slug(name):
    return name.split(" (")[0].replace(" ", "_").replace("+", "p")


def toy_runs(rows, args, workdir, extra):
    """rows: [(name, dataset, flags)]; every row x seed is one maem_gan.py run, `--jobs` at a time,
    each on one thread. A finished run (metrics.json present) is read, not rerun; its wall seconds
    are those the benchmark measured (wall.json), else the run's train_seconds. With --results,
    each run's result file goes there (bench_2d.write_result; rows named by ROW_NAMES, plus -TAG
    with --tag, which also names the run folders, so a variant never reads or overwrites a preset run)."""
    import bench_2d

    tag = f"-{args.tag}" if getattr(args, "tag", None) else ""
    jobs = []
    for seed in args.seeds:                # seed-major: a benchmark cut short still has paired rows
        for name, dataset, flags in rows:
            out = os.path.join(workdir, f"{dataset}-{name.replace(' ', '_').replace('+', 'p')}{tag}-s{seed}")
            cmd = ["--dataset", dataset, "--seed", str(seed), "--device", args.device,
                   "--log-every", "1000", *(["--steps", str(args.steps)] if args.steps else []), *flags, *extra]
            jobs.append((name, dataset, seed, cmd, out))

    def one(job):
        name, dataset, seed, cmd, out = job
        wall_path = os.path.join(out, "wall.json")
        if os.path.isfile(os.path.join(out, "metrics.json")):
            lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
            metrics = json.load(open(os.path.join(out, "metrics.json")))
            wall = json.load(open(wall_path))["wall_seconds"] if os.path.isfile(wall_path) else metrics["train_seconds"]
        else:
            shutil.rmtree(out, ignore_errors=True)
            wall, lines, metrics = run(cmd, out)
            with open(wall_path, "w") as f:
                json.dump({"wall_seconds": wall}, f)
        if args.results:
            bench_2d.write_result(args.results, "maem", dataset, ROW_NAMES.get(name, slug(name)) + tag, seed, metrics,
                                  "OMP_NUM_THREADS=1 python maem_gan.py " + " ".join(cmd), wall,
                                  "python tests/bench_maem.py " + " ".join(sys.argv[1:]))
        if "code_dims" not in metrics:                         # a run of an older maem_gan.py
            metrics = dict(metrics, **health_of(os.path.join(out, "ckpt.pt")))
        row = dict(metrics, wall_seconds=round(wall, 1), row=name, dataset=dataset, seed=seed,
                   **{k: lines[-1][k] for k in ("real_cos_nn", "real_cos_batch") if k in lines[-1]})
        print(json.dumps(row), flush=True)
        return row

    env_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"{len(jobs)} runs, {args.jobs} at a time, OMP_NUM_THREADS={env_threads}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))
    groups = [(dataset, name, [r for r in results if r["row"] == name and r["dataset"] == dataset])
              for name, dataset, _ in rows]
    table = bench_2d.table(groups, TOY_COLUMNS)
    print(f"\n{len(args.seeds)} seeds each, mean ± std (bench_2d.py's columns)\n" + "\n".join(table), flush=True)
    return {"runs": results, "table": table}


# `toy --rows`: the preset and its baseline in the same setting (same nets, budget, seeds), and
# the paper's image setting carried over to 2-D (issue 26): L_MaF (Eq. 7) as the adversarial loss
# and spectral norm on the MLP D, every other value the 2-D preset's.
TOY_ROWS = {"preset": ("MaEM-GAN", []), "baseline": ABLATION_ROWS[0],
            "image-setting": ("MaEM-GAN, image loss (L_MaF + SN)", ["--loss", "maf", "--d-spectral-norm"])}
ROW_NAMES = {name: key for key, (name, _) in TOY_ROWS.items()}      # result files' row names


def toy(args, workdir, extra):
    """ring and grid with the presets' defaults, each --rows row (flags after `--` apply to every run)."""
    rows = [(TOY_ROWS[r][0], d, TOY_ROWS[r][1]) for d in args.datasets.split(",") for r in args.rows]
    return toy_runs(rows, args, workdir, extra)


# Two more rows on 2-D data, each term alone, to tell which term balances the modes and which
# turns every code the same way.
EXTRA_2D_ROWS = [
    ("+RB-MaEM", ["--no-disomap", "--no-dlle"]),
    ("+DLLE", ["--no-disomap", "--no-entropy"]),
]


def ablation2d(args, workdir, extra):
    """The ablation rows on a 2-D preset (and each term alone), same budget for every row."""
    return toy_runs([(name, args.dataset, flags) for name, flags in ABLATION_ROWS + EXTRA_2D_ROWS],
                    args, workdir, extra)


def ablation(args, workdir, extra):
    """Table 1's five rows on stacked Fashion-MNIST (1000 modes) at a fixed step budget, with the
    project's mode classifier (trained here once if --classifier does not exist)."""
    import common

    if not os.path.isfile(args.classifier):
        print(f"training the mode classifier -> {args.classifier}", flush=True)
        acc = common.train_mode_classifier("fashion-mnist", args.classifier, root=args.data_root,
                                           device=args.device, epochs=args.classifier_epochs)["test_accuracy"]
        print(f"classifier test accuracy {acc:.4f}", flush=True)
    results = []
    for name, flags in ABLATION_ROWS:
        out = os.path.join(workdir, "ablation-" + name.split()[0].strip("+") + str(len(results)))
        cmd = ["--dataset", "stacked-fashion-mnist", "--steps", str(args.steps), "--device", args.device,
               "--classifier", args.classifier, "--eval-samples", str(args.eval_samples),
               "--log-every", str(args.log_every), "--ckpt-every", str(args.steps),
               "--sample-every", str(args.steps), "--fig3-samples", "1000", *flags, *extra]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        wall, lines, metrics = run(cmd, out)
        row = {"row": name, "flags": " ".join(flags), "modes": metrics.get("modes"),
               "reverse_kl": metrics.get("reverse_kl"), "wall_seconds": round(wall, 1),
               "ms_per_step": round(1000.0 / lines[-1]["it_s"], 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'row':<22}{'modes/1000':>12}{'reverse KL':>12}{'minutes':>10}")
    for r in results:
        print(f"{r['row']:<22}{r['modes']!s:>12}{r['reverse_kl'] if r['reverse_kl'] is None else round(r['reverse_kl'], 3)!s:>12}"
              f"{r['wall_seconds'] / 60:>10.1f}")
    return results


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cost", help="ms/step of the full method vs the L_MaF baseline")
    c.add_argument("--dataset", default="stacked-fashion-mnist", help="a maem_gan.py preset (DCGAN 32 for stacked)")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--steps", type=int, default=60, help="G steps per run")
    c.add_argument("--log-every", type=int, default=10, help="timing interval (steps)")
    c.add_argument("--repeats", type=int, default=2, help="alternating runs of each")
    t = sub.add_parser("toy", help="ring / grid mode coverage, several seeds")
    t.add_argument("--datasets", default="ring,grid")
    t.add_argument("--rows", nargs="+", default=["preset"], choices=list(TOY_ROWS),
                   help="preset: MaEM-GAN; baseline: the same preset with --no-disomap --no-dlle --no-entropy; "
                        "image-setting: the same preset with --loss maf --d-spectral-norm (the paper's "
                        "image loss and Lipschitz D carried over to 2-D)")
    t2 = sub.add_parser("ablation2d", help="the ablation rows on a 2-D preset, several seeds")
    t2.add_argument("--dataset", default="grid")
    for sp in (t, t2):
        sp.add_argument("--results", default=None,
                        help="write each run's result file here (bench_2d.py; the repository's: tests/results/2d)")
        sp.add_argument("--steps", type=int, default=None, help="G steps (default: the preset's)")
        sp.add_argument("--seeds", type=int, nargs="+", default=[0])
        sp.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
        sp.add_argument("--tag", default=None, help="appended to the row in result files and run folders "
                        "(needed with --results when --steps or flags after -- change the runs)")
    a = sub.add_parser("ablation", help="Table 1 rows on stacked Fashion-MNIST")
    a.add_argument("--steps", type=int, default=1500, help="G steps per row (fit one row in ~30 CPU minutes)")
    a.add_argument("--log-every", type=int, default=100)
    a.add_argument("--eval-samples", type=int, default=25_600, help="samples classified per row (common.STACKED_SAMPLES)")
    a.add_argument("--classifier", default="runs/fmnist-classifier.pt")
    a.add_argument("--classifier-epochs", type=int, default=12)
    a.add_argument("--data-root", default=None, help="Fashion-MNIST idx files (default: the Debian package)")
    for sp in (c, t, t2, a):
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--json", default=None, help="write the results here")
        sp.add_argument("--keep", default=None, help="keep the runs in this folder")
    args = p.parse_args(argv)
    if args.cmd in ("toy", "ablation2d") and args.results and (extra or args.steps) and not args.tag:
        p.error("--steps or flags after -- with --results need --tag (else they would overwrite the preset's result files)")
    workdir = args.keep or tempfile.mkdtemp(prefix="bench_maem-")
    os.makedirs(workdir, exist_ok=True)
    try:
        result = {"cost": cost, "toy": toy, "ablation2d": ablation2d, "ablation": ablation}[args.cmd](args, workdir, extra)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {"command": "python tests/bench_maem.py " + " ".join(sys.argv[1:]), "results": result}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
