"""tests/bench_gpu.py: its pieces (sync counter, FLOP count, speed from a log, % of peak) and a --tiny
run of a subset of its table on the CPU."""

import json
import math

import bench_gpu
import pytest
import torch
from conftest import run_script
from torch.utils.flop_counter import FlopCounterMode


def test_sync_counter_counts_each_host_read():
    x = torch.randn(5)
    with bench_gpu.SyncCounter() as c:
        x.sum().item()                       # _local_scalar_dense
        if (x > 10).any():                   # bool(tensor): _local_scalar_dense
            pass
        float(x[0])                          # _local_scalar_dense
        x.tolist()
        x.cpu()
        x[x > 0]                             # boolean mask: a data-dependent size (nonzero)
        y = x * 2 + 1                        # none of these
        torch.isfinite(y)
    assert c.counts.get("_local_scalar_dense") == 3
    assert c.counts.get("tolist") == 1 and c.counts.get("cpu") == 1
    assert c.counts.get("boolean-mask index") == 1
    assert c.total() == 6
    # the wrappers are gone afterwards
    assert all(getattr(torch.Tensor, name).__name__ != "wrapped" for name in ("tolist", "numpy", "cpu", "to"))


def test_flop_counter_of_a_linear_layer():
    b, n_in, n_out = 7, 13, 5
    net = torch.nn.Linear(n_in, n_out, bias=False)
    with FlopCounterMode(display=False) as flops:
        net(torch.randn(b, n_in))
    assert flops.get_total_flops() == 2 * b * n_in * n_out


def test_speed_is_the_median_after_the_first_interval(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": 2 * i, "it_s": v}) + "\n" for i, v in enumerate([1.0, 10, 30, 20], 1)))
    assert bench_gpu.speed_from_log(str(path)) == 20
    path.write_text(json.dumps({"step": 2, "it_s": 5.0}) + "\n")
    with pytest.raises(ValueError, match="need 2"):
        bench_gpu.speed_from_log(str(path))


def test_percent_of_peak():
    peaks = {"bf16": 1000.0, "tf32": 500.0, "fp32": 50.0}
    assert bench_gpu.percent_of_peak(10.0, "bf16", peaks, "cuda") == 1.0
    assert bench_gpu.percent_of_peak(10.0, "compile", peaks, "cuda") == 1.0
    assert bench_gpu.percent_of_peak(10.0, "fp32", peaks, "cuda") == 2.0          # TF32 is on there
    assert bench_gpu.percent_of_peak(10.0, "fp32", None, "cpu") is None
    assert dict(bench_gpu.PEAKS)["H200"] == dict(bench_gpu.PEAKS)["H100"]


def table_rows(stdout):
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows]


def test_tiny_table_on_the_cpu():
    proc = run_script(["tests/bench_gpu.py", "--device", "cpu", "--tiny", "--rows", "invert", "pgm-sfm",
                       "--modes", "fp32,bf16"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    body = [r for r in rows if r[0] not in ("row", "Inception features") and not r[0].startswith("---")]
    speed = [r for r in body if len(r) == 8]
    assert [(r[0], r[1]) for r in speed] == [(bench_gpu.ROW[k][2], m) for k in ("invert", "pgm-sfm")
                                             for m in ("fp32", "bf16")]
    for r in speed:
        it_s, ms, gflop, tflops = (float(v) for v in r[2:6])
        assert all(math.isfinite(v) and v > 0 for v in (it_s, ms, gflop, tflops)), r
        assert ms == pytest.approx(1000 / it_s, rel=0.01)
        assert tflops == pytest.approx(gflop * it_s / 1000, rel=0.02)
        assert r[6] == ""                                      # a CPU has no peak in the table
        assert float(r[7]) == 0                                # the hot loops read nothing back
    inception = {r[0]: r[1] for r in body if len(r) == 2}
    assert float(inception["common.py FID Inception"]) > 0
    if "pytorch-fid InceptionV3" in inception:
        assert float(inception["pytorch-fid InceptionV3"]) > 0
        assert "(ok)" in proc.stdout
