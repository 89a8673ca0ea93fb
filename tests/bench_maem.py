"""Benchmarks of maem_gan.py (not collected by pytest: the file name does not start with test_).

Every number comes from running the real script in a subprocess and reading what it writes
(log.jsonl's it/s, metrics.json), so the benchmark measures exactly what a user runs.

    python tests/bench_maem.py cost      # ms per training step: full MaEM-GAN vs L_MaF alone
    python tests/bench_maem.py toy       # ring and grid: modes, high-quality fraction, reverse KL
    python tests/bench_maem.py ablation  # Table 1's rows on stacked Fashion-MNIST: modes / 1000, reverse KL

Set OMP_NUM_THREADS yourself (1 on a shared CPU). `--json FILE` writes the results; `--keep DIR`
keeps the runs (default: a temporary folder). Extra flags after `--` go to every maem_gan.py run.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Table 1's rows: the baseline is the m-dim WGAN trained with L_MaF alone; each row adds terms.
ABLATION_ROWS = [
    ("baseline (L_MaF)", ["--no-disomap", "--no-dlle", "--no-entropy"]),
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


def toy(args, workdir, extra):
    """ring and grid at a fixed step budget: Table-1-style metrics of metrics.json."""
    results = {}
    for dataset in args.datasets.split(","):
        out = os.path.join(workdir, f"toy-{dataset}")
        wall, _, metrics = run(["--dataset", dataset, "--steps", str(args.steps), "--device", args.device,
                                "--sample-every", str(args.steps), "--ckpt-every", str(args.steps),
                                "--log-every", str(min(500, args.steps)), *extra], out)
        results[dataset] = dict(metrics, wall_seconds=round(wall, 1), steps=args.steps)
        print(f"{dataset}: {json.dumps(results[dataset])}", flush=True)
    return results


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
    t = sub.add_parser("toy", help="ring / grid mode coverage")
    t.add_argument("--datasets", default="ring,grid")
    t.add_argument("--steps", type=int, default=5000)
    a = sub.add_parser("ablation", help="Table 1 rows on stacked Fashion-MNIST")
    a.add_argument("--steps", type=int, default=1500, help="G steps per row (fit one row in ~30 CPU minutes)")
    a.add_argument("--log-every", type=int, default=100)
    a.add_argument("--eval-samples", type=int, default=26_000, help="samples classified per row")
    a.add_argument("--classifier", default="runs/fmnist-classifier.pt")
    a.add_argument("--classifier-epochs", type=int, default=12)
    a.add_argument("--data-root", default=None, help="Fashion-MNIST idx files (default: the Debian package)")
    for sp in (c, t, a):
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--json", default=None, help="write the results here")
        sp.add_argument("--keep", default=None, help="keep the runs in this folder")
    args = p.parse_args(argv)
    workdir = args.keep or tempfile.mkdtemp(prefix="bench_maem-")
    os.makedirs(workdir, exist_ok=True)
    try:
        result = {"cost": cost, "toy": toy, "ablation": ablation}[args.cmd](args, workdir, extra)
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
