"""The 2-D benchmark table (tests/bench_2d.py) and the three bench scripts' 2-D result files,
on made-up finished runs (no training)."""

import argparse
import json
import os
import sys

import pytest

import bench_2d


def metrics(modes=8, hq=0.96, kl=0.01, med=0.9, low=0.7, high=1.1, off=0.1, off_max=0.3, mmd=1e-4, **more):
    return dict(modes=modes, hq_fraction=hq, reverse_kl=kl, reverse_kl_hq=None if kl is None else kl - 0.02, std_ratio_median=med,
                std_ratio_min=low, std_ratio_max=high, centre_offset_median=off, centre_offset_max=off_max,
                mmd2=mmd, mmd2_real=2e-5, non_finite=0, train_seconds=100.0, **more)


def test_cells_take_the_extremes_over_every_seed_not_the_medians():
    ms = [metrics(med=0.6, low=0.4, high=0.9, off=0.1, off_max=0.5, mmd=1e-3, wall_seconds=100),
          metrics(modes=7, hq=0.90, med=0.8, low=0.7, high=1.1, off=0.3, off_max=0.4, mmd=3e-3, wall_seconds=200)]
    c = dict(zip(bench_2d.HEAD[2:], bench_2d.cells(ms, "ring")))
    assert c["seeds"] == "2"
    assert c["modes"] == "7.5 (7-8)"
    assert c["quality"] == "93.0 ± 4.2 %"
    # mean ± sample std of the medians; the smallest minimum and largest maximum of any seed
    assert c["std ratio median (min-max)"] == "0.70 ± 0.14 (0.40-1.10)"
    assert c["centre offset (max)"] == "0.20 ± 0.14 (0.50)"
    assert c["mmd2 / mmd2_real"] == "0.002 ± 0.0014 / 2e-05"
    assert c["targets"] == "0 of 2"               # seed 0: min 0.4 < 0.6; seed 1: 7 modes
    assert c["s/run"] == "150"


def test_cells_mark_a_figure_some_runs_lack():
    ms = [metrics(), metrics(med=None, low=None, high=None, off=None, off_max=None)]
    c = dict(zip(bench_2d.HEAD[2:], bench_2d.cells(ms, "ring")))
    assert c["std ratio median (min-max)"] == "0.90 (0.70-1.10) [1 of 2]"
    assert c["centre offset (max)"] == "0.10 (0.30) [1 of 2]"
    assert c["targets"] == "1 of 2"
    assert c["s/run"] == "-"


@pytest.mark.parametrize("change, ok", [({}, True), ({"med": 0.8}, True), ({"med": 1.25}, True),
                                        ({"med": 0.79}, False), ({"med": 1.26}, False), ({"low": 0.59}, False),
                                        ({"modes": 7}, False), ({"hq": 0.949}, False), ({"kl": 0.041}, False),
                                        ({"med": None, "low": None}, False), ({"kl": None}, False)])
def test_targets(change, ok):
    assert bench_2d.meets_targets(metrics(**change), "ring") is ok


def test_grid_needs_25_modes():
    assert bench_2d.meets_targets(metrics(modes=25), "grid")
    assert not bench_2d.meets_targets(metrics(modes=8), "grid")


def test_result_files_round_trip_in_table_order(tmp_path):
    for dataset, row, seed in [("grid", "preset", 0), ("ring", "baseline", 1), ("ring", "preset", 1),
                               ("ring", "preset", 0)]:
        bench_2d.write_result(str(tmp_path), "maem", dataset, row, seed, metrics(modes=MODES[dataset]),
                              "python maem_gan.py", 12.34)
    bench_2d.write_result(str(tmp_path), "pgm", "ring", "gan", 0, metrics(), "python pgm_gan.py", None)
    assert sorted(os.listdir(tmp_path))[0] == "maem-grid-preset-s0.json"
    rec = json.load(open(tmp_path / "maem-ring-preset-s1.json"))
    assert rec["wall_seconds"] == 12.3 and rec["command"] == "python maem_gan.py" and rec["metrics"]["modes"] == 8
    results = bench_2d.load_results(str(tmp_path), "maem")
    groups = bench_2d.groups_of(results, order=["preset", "baseline"])
    assert [(d, row, [m["seed"] for m in ms]) for d, row, ms in groups] == [
        ("ring", "preset", [0, 1]), ("ring", "baseline", [1]), ("grid", "preset", [0])]
    assert len(bench_2d.load_results(str(tmp_path), "maem", seeds={0})) == 2
    lines = bench_2d.table(groups)
    assert len(lines) == 5 and lines[2].startswith("| ring | preset | 2 | 8.0 (8-8) |")


MODES = bench_2d.MODES


def finished_run(folder, m, log=None):
    os.makedirs(folder)
    json.dump(m, open(os.path.join(folder, "metrics.json"), "w"))
    if log is not None:
        with open(os.path.join(folder, "log.jsonl"), "w") as f:
            f.write(json.dumps(log) + "\n")


def test_invert_bench_records_the_baseline_with_its_flags(tmp_path, monkeypatch, capsys):
    import bench_invert_gan

    out, results = str(tmp_path / "runs"), str(tmp_path / "results")
    finished_run(bench_invert_gan.run_dir(out, "gan", "ring", 3), metrics(kl=0.3))
    monkeypatch.setattr(sys, "argv", ["bench_invert_gan.py", "--out", out, "--methods", "invertgan", "gan",
                                      "--datasets", "ring", "--seeds", "3", "--summary", "--results", results])
    bench_invert_gan.main()
    rec = json.load(open(os.path.join(results, "invert-ring-gan-s3.json")))
    assert "--lambda-cons 0 --gauss-loss none" in rec["command"] and "--seed 3" in rec["command"]
    assert rec["metrics"]["reverse_kl"] == 0.3 and rec["wall_seconds"] is None
    assert os.listdir(results) == ["invert-ring-gan-s3.json"]       # no file for a run not finished
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ring")]
    assert row == ["| ring | gan | 1 | 8.0 (8-8) | 96.0 % | 0.30 | 0.28 | 0.90 (0.70-1.10) | 0.10 (0.30) "
                   "| 0.0001 / 2e-05 | 0 of 1 | - |"]


def test_invert_bench_tags_a_variant_and_never_overwrites_the_preset_row(tmp_path, monkeypatch):
    import bench_invert_gan

    out, results = str(tmp_path / "runs"), str(tmp_path / "results")
    finished_run(bench_invert_gan.run_dir(out, "invertgan", "grid", 4), metrics(kl=0.5))     # the preset's
    argv = ["bench_invert_gan.py", "--out", out, "--methods", "invertgan", "--datasets", "grid", "--seeds", "4",
            "--summary", "--results", results]
    monkeypatch.setattr(sys, "argv", argv + ["--", "--gauss-loss", "zdisc"])
    with pytest.raises(SystemExit) as e:                  # variant flags without a tag: refused
        bench_invert_gan.main()
    assert e.value.code == 2 and not os.path.exists(results)
    monkeypatch.setattr(sys, "argv", argv + ["--tag", "zdisc", "--", "--gauss-loss", "zdisc"])
    bench_invert_gan.main()
    assert not os.path.exists(results)                    # the preset's finished run is not the variant's
    finished_run(bench_invert_gan.run_dir(os.path.join(out, "zdisc"), "invertgan", "grid", 4), metrics(kl=0.1))
    bench_invert_gan.main()
    assert os.listdir(results) == ["invert-grid-invertgan-zdisc-s4.json"]
    rec = json.load(open(os.path.join(results, "invert-grid-invertgan-zdisc-s4.json")))
    assert rec["row"] == "invertgan-zdisc" and rec["command"].endswith("--seed 4 --out OUT --device cpu --gauss-loss zdisc")


def test_pgm_bench_tags_the_row_and_keeps_the_extra_flags(tmp_path, capsys, monkeypatch):
    import bench_pgm

    out, results = str(tmp_path / "runs"), str(tmp_path / "results")
    finished_run(bench_pgm.run_dir(out, "pgmgan", "ring", 1), metrics(acceptance=1.0, partition_nmi=1.0))  # preset's
    tagged = bench_pgm.run_dir(os.path.join(out, "k16"), "pgmgan", "ring", 0)
    finished_run(tagged, metrics(acceptance=1.0, partition_nmi=1.0))
    json.dump({"wall_seconds": 600.0}, open(os.path.join(tagged, "wall.json"), "w"))
    args = argparse.Namespace(out=out, probe=False, smoke=False, summary=True, results=results, tag="k16",
                              seeds=[0, 1], datasets=["ring"], variants=["pgmgan", "gan"])
    bench_pgm.bench_toy(args, ["--k", "16"])
    assert os.listdir(results) == ["pgm-ring-pgmgan-k16-s0.json"]      # seed 1's preset run is not the variant's
    rec = json.load(open(os.path.join(results, "pgm-ring-pgmgan-k16-s0.json")))
    assert rec["command"].endswith("--seed 0 --k 16") and rec["wall_seconds"] == 600.0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ring | pgmgan | 1 |")]
    assert rows and rows[0].endswith("| 600 | 1.000 | 1.000 | - |")
    with pytest.raises(SystemExit, match="smoke"):
        bench_pgm.bench_toy(argparse.Namespace(**dict(vars(args), smoke=True)), [])
    monkeypatch.setattr(sys, "argv", ["bench_pgm.py", "toy", "--out", out, "--summary", "--results", results,
                                      "--", "--k", "16"])
    with pytest.raises(SystemExit) as e:                  # variant flags with --results and no --tag
        bench_pgm.main()
    assert e.value.code == 2


def test_maem_bench_reads_a_finished_baseline_and_records_it(tmp_path, monkeypatch):
    import bench_maem

    name, flags = bench_maem.TOY_ROWS["baseline"]
    assert flags == ["--no-disomap", "--no-dlle", "--no-entropy"]
    work, results = tmp_path / "runs", str(tmp_path / "results")
    run = work / f"ring-{name.replace(' ', '_').replace('+', 'p')}-s2"
    finished_run(str(run), metrics(code_dims=2.0), log={"step": 10, "real_cos_nn": 0.5})
    json.dump({"wall_seconds": 150.0}, open(run / "wall.json", "w"))
    monkeypatch.setattr(bench_maem, "run", lambda *a, **k: pytest.fail("a finished run was rerun"))
    args = argparse.Namespace(datasets="ring", rows=["baseline"], seeds=[2], device="cpu", steps=None, jobs=1,
                              results=results)
    got = bench_maem.toy(args, str(work), [])
    rec = json.load(open(os.path.join(results, "maem-ring-baseline-s2.json")))
    assert "--seed 2" in rec["command"] and rec["command"].endswith("--no-disomap --no-dlle --no-entropy")
    assert rec["wall_seconds"] == 150.0 and "real_cos_nn" not in rec["metrics"]
    assert got["table"][2].startswith(f"| ring | {name} | 1 | 8.0 (8-8) | 96.0 % |")
    assert got["table"][2].endswith("| 150 | 0.500 | - | - | - | 2.000 |")


def test_maem_bench_tag_keeps_a_variant_apart_from_the_finished_preset(tmp_path, monkeypatch):
    import bench_maem

    work, results = tmp_path / "runs", str(tmp_path / "results")
    finished_run(str(work / "grid-MaEM-GAN-s1"), metrics(), log={"step": 10})      # the preset's run
    ran = []

    def fake_run(cmd, out):
        ran.append(cmd)
        os.makedirs(out)
        return 60.0, [{"step": 10}], dict(metrics(kl=0.2), code_dims=1.0)
    monkeypatch.setattr(bench_maem, "run", fake_run)
    args = argparse.Namespace(datasets="grid", rows=["preset"], seeds=[1], device="cpu", steps=None, jobs=1,
                              results=results, tag="nc3")
    bench_maem.toy(args, str(work), ["--n-critic", "3"])
    assert len(ran) == 1 and ran[0][-2:] == ["--n-critic", "3"]       # not read from the preset's folder
    assert os.listdir(results) == ["maem-grid-preset-nc3-s1.json"]
    assert json.load(open(os.path.join(results, "maem-grid-preset-nc3-s1.json")))["metrics"]["reverse_kl"] == 0.2
    for variant in (["--", "--n-critic", "3"], ["--steps", "20000"]):   # a variant with --results and no --tag
        monkeypatch.setattr(sys, "argv", ["bench_maem.py", "toy", "--results", results, *variant])
        with pytest.raises(SystemExit) as e:
            bench_maem.main()
        assert e.value.code == 2


def test_maem_image_setting_row_changes_only_the_loss_and_spectral_norm():
    import bench_maem
    import maem_gan

    for dataset in ("ring", "grid"):
        preset = vars(maem_gan.parse_args(["--dataset", dataset]))
        row = vars(maem_gan.parse_args(["--dataset", dataset, *bench_maem.TOY_ROWS["image-setting"][1]]))
        assert (row["loss"], row["d_spectral_norm"]) == ("maf", True) and (preset["loss"], preset["d_spectral_norm"]) == ("ns", False)
        assert {k for k in row if row[k] != preset[k]} == {"loss", "d_spectral_norm"}
    assert bench_maem.ROW_NAMES["MaEM-GAN, image loss (L_MaF + SN)"] == "image-setting"
