"""Table 1 benchmark for invert_gan.py: modes / quality / reverse KL over seeds, on this CPU.

    python tests/bench_invert_gan.py --out runs/bench-invert --seeds 0 1 2 3 4 --jobs 2
    python tests/bench_invert_gan.py --out runs/bench-invert --summary     # table of what is done

Runs every (method, dataset, seed) with the script's default flags (24K steps on the ring, 48K
on the grid, batch 128), one process per run with OMP_NUM_THREADS=1, `--jobs` at a time, and
skips runs whose metrics.json exists (so an interrupted benchmark continues). The table gives the
standard reverse KL (all samples) and the paper's (reverse_kl_hq: high-quality samples only,
Sec. 5.1). Methods (Table 1 rows):
    invertgan  default flags (p-norm MD Gaussian loss + L_cons)
    gan        --lambda-cons 0 --gauss-loss none      (plain GAN, same networks)
    1d         --gauss-loss w2-1d                     (the 1-D Gaussian loss of Eq. 11)
Not collected by pytest (no test_ prefix).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"invertgan": [], "gan": ["--lambda-cons", "0", "--gauss-loss", "none"],
           "1d": ["--gauss-loss", "w2-1d"]}


def run_dir(out, method, dataset, seed):
    return os.path.join(out, f"{method}-{dataset}-{seed}")


def summary(out, methods, datasets, seeds):
    rows = []
    for dataset in datasets:
        for method in methods:
            found = []
            for seed in seeds:
                path = os.path.join(run_dir(out, method, dataset, seed), "metrics.json")
                if os.path.isfile(path):
                    found.append(json.load(open(path)))
            if not found:
                continue

            def ms(key, scale=1.0):
                vals = [scale * m[key] for m in found if key in m]    # runs of older code lack reverse_kl_hq
                if not vals:
                    return "-"
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                return f"{statistics.mean(vals):.2f} ± {sd:.2f}"

            rows.append((dataset, method, len(found), ms("modes"), ms("hq_fraction", 100),
                         ms("reverse_kl"), ms("reverse_kl_hq"),
                         f"{statistics.mean(m['train_seconds'] for m in found):.0f}"))
    # reverse KL: nearest-mode histogram of all samples (the standard one); reverse KL (hq): the
    # paper's Sec. 5.1 form, high-quality samples only (sum p_i < 1, may be negative).
    head = ("dataset", "method", "seeds", "modes", "quality %", "reverse KL", "reverse KL (hq)", "s/run")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "bench-invert"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--datasets", nargs="+", default=["ring", "grid"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--summary", action="store_true", help="only print the table of finished runs")
    p.add_argument("extra", nargs="*", help="extra flags for invert_gan.py (after --)")
    args = p.parse_args()
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
                cmd = [sys.executable, os.path.join(ROOT, "invert_gan.py"), "--dataset", d,
                       "--seed", str(s), "--out", out, "--device", "cpu", *METHODS[m], *args.extra]
                log = open(out + ".log", "w") if os.makedirs(args.out, exist_ok=True) is None else None
                running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), m, d, s))
                print(f"started {m} {d} seed {s}", flush=True)
            time.sleep(2)
            for item in list(running):
                if item[0].poll() is not None:
                    running.remove(item)
                    print(f"finished {item[1]} {item[2]} seed {item[3]} (exit {item[0].returncode})", flush=True)
    summary(args.out, args.methods, args.datasets, args.seeds)


if __name__ == "__main__":
    main()
