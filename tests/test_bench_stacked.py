"""tests/bench_stacked.py on fake stacked Fashion-MNIST (idx files written here, not the real data):
its table, and a second invocation that skips finished runs and resumes cut-off ones."""

import json
import os

import bench_stacked
from PIL import Image
from conftest import run_script
from test_common import write_mnist

ROWS = ["invert", "pgm"]          # the InvertGAN shim and PGMGAN's stage files: the two special paths


def bench(out, root):
    proc = run_script(["tests/bench_stacked.py", "--smoke", "--device", "cpu", "--out", out, "--data-root", root,
                       "--rows", *ROWS, "--seeds", "0", "--jobs", "2"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def launched(stdout):
    return [line for line in stdout.splitlines() if line.startswith("$ ")]


def counted(stdout):
    return [line for line in stdout.splitlines() if line.startswith("counted ")]


def table_cells(text):
    """{row label: [cells]} of the markdown table's body."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def snapshot(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def test_table_skip_and_resume(tmp_path):
    root, out = str(tmp_path / "fmnist"), str(tmp_path / "out")
    # Constant images (20 * label): a classifier of a few epochs separates them (test_metrics does too).
    write_mnist(root, n_train=700, n_test=300)
    first = bench(out, root)
    assert len(launched(first)) == 1 + len(ROWS)                          # the classifier and each run
    table = open(os.path.join(out, "table.md")).read()
    cells = table_cells(table)
    results = json.load(open(os.path.join(out, "results.json")))["results"]
    for key in ROWS:
        run = os.path.join(out, f"{key}-s0")
        modes = json.load(open(os.path.join(run, "modes.json")))
        assert modes["samples"] == bench_stacked.SIZES["smoke"]["eval_samples"]
        assert 0 <= modes["modes"] <= 1000 and 0 <= modes["counted_fraction"] <= 1
        # the table's row is this seed's count (one seed: the mean, no std)
        row = cells[bench_stacked.ROW[key][2]]
        assert row[1:5] == ["1", bench_stacked.cell([modes["modes"]], 1),
                            bench_stacked.cell([modes["reverse_kl"]], 3),
                            bench_stacked.cell([modes["counted_fraction"]], 3)]
        assert [m["modes"] for m in results[key]] == [modes["modes"]]
        assert Image.open(os.path.join(out, "grids", f"{key}.png")).size == (8 * 34 + 2, 4 * 34 + 2)
    runs = {key: os.path.join(out, f"{key}-s0") for key in ROWS}
    before = {key: snapshot(run) for key, run in runs.items()}
    log = open(os.path.join(runs["invert"], "log.jsonl")).read()

    # Again: every run and the classifier are done, nothing starts, nothing is rewritten.
    second = bench(out, root)
    assert launched(second) == [] and counted(second) == []
    assert all(f"done: {key}-s0 (skipped)" in second for key in ROWS)
    assert {key: snapshot(run) for key, run in runs.items()} == before
    assert open(os.path.join(out, "table.md")).read() == table

    # Cut-off runs: InvertGAN killed in its final metrics (ckpt.pt at the last step), PGMGAN
    # killed in its GAN stage before the first checkpoint (pretext.pt and partition.pt kept).
    os.remove(os.path.join(runs["invert"], "metrics.json"))
    for name in ("metrics.json", "ckpt.pt"):
        os.remove(os.path.join(runs["pgm"], name))
    third = bench(out, root)
    starts = launched(third)
    assert len(starts) == 2 and all(s.endswith("--resume") for s in starts), starts
    assert len(counted(third)) == 2                                        # both counted again
    after = {key: snapshot(run) for key, run in runs.items()}
    assert after["invert"]["ckpt.pt"] == before["invert"]["ckpt.pt"]      # continued, not retrained
    assert open(os.path.join(runs["invert"], "log.jsonl")).read() == log          # no step trained again
    for name in ("pretext.pt", "partition.pt"):                            # stages not redone
        assert after["pgm"][name] == before["pgm"][name]
    assert all(os.path.isfile(os.path.join(run, "metrics.json")) for run in runs.values())
    assert table_cells(open(os.path.join(out, "table.md")).read()).keys() == cells.keys()


def test_table_is_mean_and_sample_std_over_seeds():
    results = {"maem": [{"modes": 100, "reverse_kl": 1.0, "counted_fraction": 0.5},
                        {"modes": 110, "reverse_kl": None, "counted_fraction": 0.6},   # no counted mode
                        {"modes": 120, "reverse_kl": 2.0, "counted_fraction": 0.7}]}
    cells = table_cells(bench_stacked.table(results, ["maem-base", "maem"]))
    assert cells["MaEM-GAN (all terms)"][1:5] == ["3", "110.0 ± 10.0", "1.500 ± 0.707 (2 of 3)", "0.600 ± 0.100"]
    assert cells["MaEM-GAN baseline: L_MaF alone"][1:5] == ["0", "-", "-", "-"]
