"""Table 1 benchmark for invert_gan.py: modes / quality / reverse KL over seeds, on this CPU.

    python tests/bench_invert_gan.py --out runs/bench-invert --seeds 0 1 2 3 4 --jobs 2
    python tests/bench_invert_gan.py --out runs/bench-invert --summary     # table of what is done
    python tests/bench_invert_gan.py --out runs/2d-invert --methods invertgan gan --jobs 1 --results tests/results/2d

Runs every (method, dataset, seed) with the script's default flags (24K steps on the ring, 48K
on the grid, batch 128), one process per run with OMP_NUM_THREADS=1, `--jobs` at a time, and
skips runs whose metrics.json exists (so an interrupted benchmark continues). The table has
bench_2d.py's columns: the standard reverse KL (all samples) and the paper's (reverse_kl_hq:
high-quality samples only, Sec. 5.1), and the within-mode ones (std ratio, centre offset, MMD).
With --results each finished run's result file (metrics, command, wall seconds) goes there, as
<results>/invert-<dataset>-<method>[-<tag>]-s<seed>.json (--tag names what the flags after -- change;
its runs go to OUT/<tag>/; --results with such flags and no --tag is refused, so a variant never
reuses a preset's run or overwrites its row).
Methods (Table 1 rows):
    invertgan  default flags (p-norm MD Gaussian loss + L_cons)
    gan        --lambda-cons 0 --gauss-loss none      (plain GAN, same networks)
    1d         --gauss-loss w2-1d                     (the 1-D Gaussian loss of Eq. 11)
Not collected by pytest (no test_ prefix).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import bench_2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"invertgan": [], "gan": ["--lambda-cons", "0", "--gauss-loss", "none"],
           "1d": ["--gauss-loss", "w2-1d"]}


def run_dir(out, method, dataset, seed):
    return os.path.join(out, f"{method}-{dataset}-{seed}")


def command(method, dataset, seed, out, extra):
    """invert_gan.py's arguments for one run."""
    return ["--dataset", dataset, "--seed", str(seed), "--out", out, "--device", "cpu", *METHODS[method], *extra]


def finished(out, method, dataset, seed):
    """metrics.json of a finished run with wall_seconds (wall.json, written when this benchmark
    started and saw the run end; else None), or None if the run has not finished."""
    run = run_dir(out, method, dataset, seed)
    path = os.path.join(run, "metrics.json")
    if not os.path.isfile(path):
        return None
    wall = os.path.join(run, "wall.json")
    return dict(json.load(open(path)), seed=seed,
                wall_seconds=json.load(open(wall))["wall_seconds"] if os.path.isfile(wall) else None)


def record(results, out, method, dataset, seed, extra, tag=None):
    m = finished(out, method, dataset, seed)
    metrics = {k: v for k, v in m.items() if k not in ("seed", "wall_seconds")}
    row = method + (f"-{tag}" if tag else "")
    bench_2d.write_result(results, "invert", dataset, row, seed, metrics,
                          "OMP_NUM_THREADS=1 python invert_gan.py " + " ".join(command(method, dataset, seed, "OUT", extra)),
                          m["wall_seconds"], "python tests/bench_invert_gan.py " + " ".join(sys.argv[1:]))


def summary(out, methods, datasets, seeds):
    """bench_2d.table of the finished runs (s/run: the wall seconds measured, else none)."""
    groups = [(dataset, method, [m for m in (finished(out, method, dataset, s) for s in seeds) if m])
              for dataset in datasets for method in methods]
    lines = bench_2d.table(groups)
    print("\n".join(lines))
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "bench-invert"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--datasets", nargs="+", default=["ring", "grid"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--summary", action="store_true", help="only print the table of finished runs")
    p.add_argument("--results", default=None,
                   help="write each finished run's result file here (bench_2d.py; the repository's: tests/results/2d)")
    p.add_argument("--tag", default=None, help="appended to the method in result files' row names (e.g. zdisc)")
    p.add_argument("extra", nargs="*", help="extra flags for invert_gan.py (after --)")
    args = p.parse_args()
    if args.results and args.extra and not args.tag:
        p.error("flags after -- with --results need --tag (else they would overwrite the preset's result files)")
    if args.tag:                   # a tagged variant's runs live apart from the preset's (never reused)
        args.out = os.path.join(args.out, args.tag)
    if not args.summary:
        todo = [(m, d, s) for s in args.seeds for m in args.methods for d in args.datasets
                if not os.path.isfile(os.path.join(run_dir(args.out, m, d, s), "metrics.json"))]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        running = []
        while todo or running:
            while todo and len(running) < args.jobs:
                m, d, s = todo.pop(0)
                out = run_dir(args.out, m, d, s)
                if os.path.isdir(out):                 # a run cut off earlier: start it again
                    subprocess.run(["rm", "-rf", out], check=True)
                cmd = [sys.executable, os.path.join(ROOT, "invert_gan.py"), *command(m, d, s, out, args.extra)]
                log = open(out + ".log", "w") if os.makedirs(args.out, exist_ok=True) is None else None
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((proc, m, d, s, time.perf_counter()))
                print(f"started {m} {d} seed {s}", flush=True)
            time.sleep(2)
            for item in list(running):
                proc, m, d, s, t0 = item
                if proc.poll() is not None:
                    running.remove(item)
                    print(f"finished {m} {d} seed {s} (exit {proc.returncode})", flush=True)
                    if proc.returncode == 0:
                        with open(os.path.join(run_dir(args.out, m, d, s), "wall.json"), "w") as f:
                            json.dump({"wall_seconds": time.perf_counter() - t0}, f)
                        if args.results:
                            record(args.results, args.out, m, d, s, args.extra, args.tag)
    if args.results:               # also the runs finished before (result files are rewritten)
        for d in args.datasets:
            for m in args.methods:
                for s in args.seeds:
                    if finished(args.out, m, d, s):
                        record(args.results, args.out, m, d, s, args.extra, args.tag)
    summary(args.out, args.methods, args.datasets, args.seeds)


if __name__ == "__main__":
    main()
