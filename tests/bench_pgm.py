"""Benchmarks of pgm_gan.py on this CPU: the kNN graph, the 2-D table, stacked Fashion-MNIST.

    python tests/bench_pgm.py knn --n 50000 --dim 512               # time + peak memory of the graph
    python tests/bench_pgm.py toy --out runs/bench-pgm --jobs 2     # 2-D grid/ring, PGMGAN + baselines
    python tests/bench_pgm.py stacked --out runs/bench-pgm-sfm      # stacked Fashion-MNIST, small scale
    python tests/bench_pgm.py toy --out runs/bench-pgm --summary    # only print the finished table
    python tests/bench_pgm.py toy --out /tmp/smoke --smoke          # a few steps of every run (CI)
    python tests/bench_pgm.py toy --out runs/x --variants pgmgan unconstrained --probe   # Fig. 3: descents on R_i
    python tests/bench_pgm.py toy --out runs/2d-pgm --variants partition gan --seeds 0 1 2 --results tests/results/2d
    python tests/bench_pgm.py toy --out runs/2d-pgm-k16 --datasets ring --tag k16 --results tests/results/2d -- --k 16

Variants (PGMGAN's Table 1 rows, from flags of the same script):
    pgmgan     default flags
    partition  --guide-weight 0          ("Partition GAN": no guide)
    random     --partition random        ("Random Partition ID")
    gan        --k 1                     (one plain GAN, same networks)
    unconstrained --partitioner unconstrained (Sec. 5.1's ablation, Fig. 3-4 right: S a ReLU MLP)
Every run is one `pgm_gan.py` process with OMP_NUM_THREADS=1 (`--jobs` at a time); runs whose
metrics.json exists are skipped, and a run cut off earlier is continued with --resume, so an
interrupted benchmark picks up where it stopped. Extra flags for pgm_gan.py go after `--`.
The 2-D table has bench_2d.py's columns (modes, quality, reverse KL, within-mode std ratio, centre
offset, MMD) and PGMGAN's own (acceptance, partition NMI); with --results each finished run's result
file goes there as <results>/pgm-<dataset>-<variant>[-<tag>]-s<seed>.json (--tag names what the
flags after `--` change, e.g. k16, and puts the runs in OUT/<tag>/; --results with such flags needs it).
For stacked Fashion-MNIST the mode classifier is trained first (common.train_mode_classifier,
as `evaluate.py classifier`) unless --classifier names one; the pretext and partition stages run
once and the "partition" variant reuses their files (same partitioner, no guide).
Not collected by pytest (no test_ prefix).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VARIANTS = {"pgmgan": [], "partition": ["--guide-weight", "0"], "random": ["--partition", "random"],
            "gan": ["--k", "1"], "unconstrained": ["--partitioner", "unconstrained"]}
# Stacked Fashion-MNIST at a small scale (ours; measured on a 2-core CPU shared by 2-4 jobs: the
# PGMGAN run, all stages, 56 min; each GAN-only variant 23-35 min): DCGAN width 16 instead of the
# SN-GAN ResNet (6.5 s vs 0.9 s CPU per iteration of 4 D + 1 G steps at batch 64, measured here),
# 2 D steps per G step, k = 50, a 4-block partitioner, short pretext/partition stages, and the
# official guide (mean over c, lambda 6.0, annealed to 0 over the run).
STACKED_SMALL = ["--arch", "dcgan", "--width", "16", "--z-dim", "64", "--batch-size", "64",
                 "--steps", "2500", "--n-dis", "2", "--k", "50",
                 "--pretext-steps", "600", "--pretext-batch-size", "128", "--pretext-lr", "0.1",
                 "--part-blocks", "4", "--part-width", "16", "--part-levels", "3",
                 "--part-steps", "1000", "--part-batch-size", "128", "--part-lr", "1e-3",
                 "--part-samples", "20000", "--ema", "0", "--guide-reduce", "mean",
                 "--guide-anneal", "2.4e-3", "--eval-samples", "10000", "--log-every", "100",
                 "--ckpt-every", "500", "--sample-every", "500"]
SMOKE_TOY = ["--steps", "20", "--part-steps", "10", "--part-samples", "500", "--eval-samples", "1000",
             "--log-every", "10", "--ckpt-every", "10", "--sample-every", "20", "--reject-tries", "2"]
SMOKE_STACKED = ["--steps", "4", "--pretext-steps", "2", "--part-steps", "2", "--part-samples", "300",
                 "--eval-samples", "200", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "4",
                 "--reject-tries", "2"]


# ---------------------------------------------------------------- kNN graph
def bench_knn(args):
    """Time and peak memory of common.knn_graph on random (N, dim) features. Peak memory: the
    growth of the process's peak resident set size (ru_maxrss) over the features themselves
    (CPU), or torch.cuda.max_memory_allocated (CUDA)."""
    import torch

    import common

    device = torch.device(args.device)
    torch.manual_seed(0)
    feats = torch.randn(args.n, args.dim, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    nbrs = common.knn_graph(feats, args.k, "cosine", args.chunk_mb, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0          # CPU time: comparable on a shared machine
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    # exactness spot check on 200 rows against a brute-force row of the same features
    f = torch.nn.functional.normalize(feats.float(), dim=1)
    rows = torch.arange(0, args.n, max(1, args.n // 200))[:200].to(device)
    sims = f[rows] @ f.T
    sims[torch.arange(len(rows)), rows] = float("-inf")
    ref = sims.topk(args.k, dim=1).indices.sort(1).values.cpu()
    exact = bool((nbrs[rows.cpu()].sort(1).values == ref).all())
    result = {"n": args.n, "dim": args.dim, "neighbors": args.k, "device": str(device),
              "chunk_mb": args.chunk_mb, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
              "peak_extra_mb": round(peak / 2 ** 20, 1),
              "features_mb": round(feats.numel() * 4 / 2 ** 20, 1),
              "full_matrix_mb": round(args.n ** 2 * 4 / 2 ** 20, 1), "exact_on_200_rows": exact,
              "torch_threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------- the guide's descent on trained S
def guide_probe(out, starts=400, iters=300, seed=0):
    """Fig. 3's claim on a trained partitioner (run dir `out`): normalised gradient descent on R_i
    from `starts` uniform points of the plot's square, for every non-empty partition i; returns
    the share of (start, i) pairs that end outside A_i (stuck in a flat region or local minimum)."""
    import torch

    import common
    import pgm_gan

    part = common.load_checkpoint(os.path.join(out, "partition.pt"))
    args = argparse.Namespace(**part["args"])
    S = pgm_gan.build_partitioner(args, 2)
    S.load_state_dict(part["S"])
    S.eval().requires_grad_(False)
    lo, hi = common.extent_for(args.dataset)[:2]
    gen = torch.Generator().manual_seed(seed)
    start = torch.rand(starts, 2, generator=gen) * (hi - lo) + lo
    stuck = total = 0
    for i in (part["sizes"] > 0).nonzero().squeeze(1).tolist():
        stuck += int((descend_on_guide(S, start, i, iters, step=0.05) > 0).sum())
        total += starts
    return stuck / total


def descend_on_guide(S, start, i, iters=400, step=0.1):
    """Normalised gradient descent on R_i from each start (B, 2); returns R_i at the end (B,).
    Used by guide_probe and by tests/test_pgm_gan.py."""
    import torch

    import pgm_gan

    x = start.clone().requires_grad_(True)
    y = torch.full((len(start),), i)
    for _ in range(iters):
        r = pgm_gan.guide(S(x), y)
        if torch.all(r == 0):
            break
        g, = torch.autograd.grad(r.sum(), x)
        with torch.no_grad():
            x -= step * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12) * (r > 0).float()[:, None]
    return pgm_gan.guide(S(x.detach()), y)


# ---------------------------------------------------------------- runs of pgm_gan.py
def run_dir(out, variant, dataset, seed):
    return os.path.join(out, f"{variant}-{dataset}-{seed}")


def launch(out, dataset, flags, log_path):
    """Start pgm_gan.py for one run (continuing it with --resume if it was cut off)."""
    gan_only = "--stage" in flags and flags[flags.index("--stage") + 1] == "gan"
    if gan_only:               # its stage files were copied in: continue only a started GAN
        resume = os.path.isfile(os.path.join(out, "ckpt.pt"))
    else:
        resume = any(os.path.isfile(os.path.join(out, f)) for f in ("ckpt.pt", "partition.pt", "pretext.pt"))
        if os.path.isdir(out) and not resume:
            shutil.rmtree(out)
    cmd = [sys.executable, os.path.join(ROOT, "pgm_gan.py"), "--dataset", dataset, "--out", out,
           "--device", "cpu", *flags] + (["--resume"] if resume else [])
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "a")
    print(" ".join(cmd), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def run_all(jobs_list, n_jobs, on_exit=None):
    """jobs_list: [(out, dataset, flags, before)] where `before` is a callable run just before the
    job starts (or None). Runs them `n_jobs` at a time; returns {out: exit code}. A run that exits
    0 gets wall.json (its process's wall seconds; of the last part only, if it was resumed), then
    on_exit(out) is called."""
    codes, running, todo = {}, [], list(jobs_list)
    while todo or running:
        while todo and len(running) < n_jobs:
            out, dataset, flags, before = todo.pop(0)
            if os.path.isfile(os.path.join(out, "metrics.json")):
                continue
            if before is not None and not before():
                todo.append((out, dataset, flags, before))      # its input is not ready yet
                if all(b is not None for _, _, _, b in todo) and not running:
                    raise SystemExit(f"cannot start {out}: its input never appeared")
                break
            running.append((out, launch(out, dataset, flags, out.rstrip("/") + ".log"), time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            out, proc, t0 = item
            if proc.poll() is not None:
                codes[out] = proc.returncode
                running.remove(item)
                print(f"{out}: exit {proc.returncode}", flush=True)
                if proc.returncode == 0:
                    with open(os.path.join(out, "wall.json"), "w") as f:
                        json.dump({"wall_seconds": time.perf_counter() - t0}, f)
                    if on_exit is not None:
                        on_exit(out)
    return codes


def summary(out, variants, datasets, seeds, keys, means=True):
    rows = []
    for dataset in datasets:
        for variant in variants:
            for seed in seeds:
                path = os.path.join(run_dir(out, variant, dataset, seed), "metrics.json")
                if not os.path.isfile(path):
                    continue
                m = json.load(open(path))
                rows.append([dataset, variant, seed] + [_fmt(m.get(k)) for k in keys]
                            + [_fmt(m.get("train_seconds"))])
    head = ["dataset", "variant", "seed", *keys, "seconds"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    if means and len(seeds) > 1:
        mean_table(out, variants, datasets, seeds, keys)
    return rows


def mean_table(out, variants, datasets, seeds, keys):
    """Mean ± sample std over the finished seeds of each (dataset, variant)."""
    head = ["dataset", "variant", "seeds", *keys, "seconds"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for dataset in datasets:
        for variant in variants:
            found = [json.load(open(p)) for p in
                     (os.path.join(run_dir(out, variant, dataset, s), "metrics.json") for s in seeds)
                     if os.path.isfile(p)]
            if not found:
                continue
            cells = []
            for key in [*keys, "train_seconds"]:
                vals = [m[key] for m in found if isinstance(m.get(key), (int, float))]
                if not vals:
                    cells.append("-")
                    continue
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.4g} ± {sd:.2g}")
            print("| " + " | ".join([dataset, variant, str(len(found)), *cells]) + " |")


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


TOY_KEYS = ["modes", "hq_fraction", "reverse_kl", "std_ratio_median", "std_ratio_min", "centre_offset_median",
            "mmd2", "acceptance", "forced", "partition_nmi", "partitions_used"]
TOY_EXTRA = [("acceptance", "acceptance"), ("partition_nmi", "partition NMI"), ("partitions_used", "partitions used")]


def finished_2d(out, variant, dataset, seed):
    """metrics.json of a finished run with seed and wall_seconds (wall.json, else None), or None."""
    run = run_dir(out, variant, dataset, seed)
    if not os.path.isfile(os.path.join(run, "metrics.json")):
        return None
    wall = os.path.join(run, "wall.json")
    return dict(json.load(open(os.path.join(run, "metrics.json"))), seed=seed,
                wall_seconds=json.load(open(wall))["wall_seconds"] if os.path.isfile(wall) else None)


def toy_table(out, variants, datasets, seeds):
    """bench_2d.table of the finished 2-D runs, PGMGAN's own columns after it."""
    import bench_2d

    groups = [(d, v, [m for m in (finished_2d(out, v, d, s) for s in seeds) if m]) for d in datasets for v in variants]
    lines = bench_2d.table(groups, TOY_EXTRA)
    print("\n" + "\n".join(lines))
    return lines


def record_2d(args, extra, variant, dataset, seed):
    """Write one finished 2-D run's result file into args.results (bench_2d.write_result)."""
    import bench_2d

    out = run_dir(args.out, variant, dataset, seed)
    m = finished_2d(args.out, variant, dataset, seed)
    metrics = {k: v for k, v in m.items() if k not in ("seed", "wall_seconds")}
    row = variant + (f"-{args.tag}" if args.tag else "")
    flags = ["--dataset", dataset, "--out", "OUT", "--device", "cpu", *toy_flags(args, variant, seed, extra)]
    bench_2d.write_result(args.results, "pgm", dataset, row, seed, metrics,
                          "OMP_NUM_THREADS=1 python pgm_gan.py " + " ".join(flags), m["wall_seconds"],
                          "python tests/bench_pgm.py " + " ".join(sys.argv[1:]))
    return out


def toy_flags(args, variant, seed, extra):
    return [*VARIANTS[variant], "--seed", str(seed), *(SMOKE_TOY if args.smoke else []), *extra]


STACKED_KEYS = ["modes", "reverse_kl", "acceptance", "forced", "partition_nmi", "partition_accuracy",
                "partitions_used"]


def bench_toy(args, extra):
    if args.tag:                   # a tagged variant's runs live apart from the preset's (never reused)
        args.out = os.path.join(args.out, args.tag)
    if args.probe:
        for dataset in args.datasets:
            for variant in args.variants:
                for seed in args.seeds:
                    out = run_dir(args.out, variant, dataset, seed)
                    if os.path.isfile(os.path.join(out, "partition.pt")):
                        print(f"{dataset} {variant} seed {seed}: {100 * guide_probe(out):.1f} % of descents "
                              f"on R_i end outside A_i", flush=True)
        return None
    if args.smoke and args.results:
        raise SystemExit("--smoke runs are not results: leave out --results")
    which = {run_dir(args.out, v, d, s): (v, d, s) for s in args.seeds for d in args.datasets for v in args.variants}
    on_exit = (lambda out: record_2d(args, extra, *which[out])) if args.results else None
    if not args.summary:
        jobs = []
        for seed in args.seeds:
            for dataset in args.datasets:
                for variant in args.variants:
                    flags = toy_flags(args, variant, seed, extra)
                    jobs.append((run_dir(args.out, variant, dataset, seed), dataset, flags, None))
        run_all(jobs, args.jobs, on_exit)
    if args.results:               # also the runs finished before (result files are rewritten)
        for out, (v, d, s) in which.items():
            if finished_2d(args.out, v, d, s):
                record_2d(args, extra, v, d, s)
    rows = summary(args.out, args.variants, args.datasets, args.seeds, TOY_KEYS, means=False)
    toy_table(args.out, args.variants, args.datasets, args.seeds)
    return rows


def bench_stacked(args, extra):
    dataset = "stacked-fashion-mnist"
    small = [*STACKED_SMALL, *(SMOKE_STACKED if args.smoke else [])]
    if args.data_root:
        small += ["--data-root", args.data_root]
    classifier = args.classifier or os.path.join(args.out, "fmnist-classifier.pt")
    if not args.summary:
        if not os.path.isfile(classifier):
            import common

            acc = common.train_mode_classifier("fashion-mnist", classifier, root=args.data_root,
                                               epochs=1 if args.smoke else 12)["test_accuracy"]
            print(f"mode classifier: test accuracy {acc:.4f} -> {classifier}", flush=True)
        jobs = []
        for seed in args.seeds:
            learned = run_dir(args.out, "pgmgan", dataset, seed)
            for variant in args.variants:
                out = run_dir(args.out, variant, dataset, seed)
                flags = [*small, *VARIANTS[variant], "--seed", str(seed), "--classifier", classifier, *extra]
                before = None
                if variant == "partition" and "pgmgan" in args.variants:
                    # reuse the pretext + partition stages of the PGMGAN run: same S, no guide
                    flags += ["--stage", "gan"]
                    before = _copy_stage_files(learned, out)
                jobs.append((out, dataset, flags, before))
        run_all(jobs, args.jobs)
    return summary(args.out, args.variants, [dataset], args.seeds, STACKED_KEYS)


def _copy_stage_files(src, dst):
    def before():
        if not os.path.isfile(os.path.join(src, "partition.pt")):
            return False
        if not os.path.isfile(os.path.join(dst, "partition.pt")):
            os.makedirs(dst, exist_ok=True)
            for name in ("pretext.pt", "partition.pt"):
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copy(os.path.join(src, name), os.path.join(dst, name))
        return True
    return before


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("knn", help="time and peak memory of the kNN graph")
    k.add_argument("--n", type=int, default=50_000)
    k.add_argument("--dim", type=int, default=512)
    k.add_argument("--k", type=int, default=20, help="neighbours")
    k.add_argument("--chunk-mb", type=float, default=256.0)
    k.add_argument("--device", default="cpu")
    table = [v for v in VARIANTS if v != "unconstrained"]          # Table 1's rows (the default)
    for name, variants, datasets in (("toy", table, ["grid", "ring"]), ("stacked", table, None)):
        s = sub.add_parser(name, help=f"{name} benchmark runs")
        s.add_argument("--out", default=os.path.join("runs", f"bench-pgm-{name}"))
        s.add_argument("--seeds", type=int, nargs="+", default=[0])
        s.add_argument("--variants", nargs="+", default=variants, choices=list(VARIANTS))
        if datasets:
            s.add_argument("--datasets", nargs="+", default=datasets, choices=["grid", "ring"])
        else:
            s.add_argument("--data-root", default=None, help="Fashion-MNIST idx files (default: the Debian package's)")
            s.add_argument("--classifier", default=None, help="mode classifier file (default: trained into --out)")
        s.add_argument("--jobs", type=int, default=1)
        s.add_argument("--smoke", action="store_true", help="a few steps of every run (checks the command)")
        s.add_argument("--summary", action="store_true", help="only print the table of finished runs")
        s.add_argument("--probe", action="store_true",
                       help="toy: gradient descent on R_i of each finished run's partitioner (Fig. 3)")
        if datasets:
            s.add_argument("--results", default=None,
                           help="write each finished run's result file here (bench_2d.py; the repository's: tests/results/2d)")
            s.add_argument("--tag", default=None, help="appended to the variant in result files' row names (e.g. k16)")
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = p.parse_args(argv)
    if args.cmd == "toy" and args.results and extra and not args.tag:
        p.error("flags after -- with --results need --tag (else they would overwrite the preset's result files)")
    if args.cmd == "knn":
        bench_knn(args)
    elif args.cmd == "toy":
        bench_toy(args, extra)
    else:
        bench_stacked(args, extra)


if __name__ == "__main__":
    main()
