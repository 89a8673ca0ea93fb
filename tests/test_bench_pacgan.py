"""--arch pacgan in the method scripts (PacGAN's Table 3 protocol) and tests/bench_pacgan.py's table
runner, on fake stacked Fashion-MNIST (idx files written here, not the real data)."""

import argparse
import json
import os

import pytest
import torch

import bench_pacgan
import common
import invert_gan
import maem_gan
import pgm_gan
from conftest import run_script
from test_common import write_mnist

# ---------------------------------------------------------------- the presets
# PacGAN fjxmlzn/PacGAN stacked_MNIST_experiments/unrolled_GAN_experiment/D=0.25G config.py/model.py.
PROTOCOL = dict(arch="pacgan", img_size=28, z_dim=256, batch_size=128, lr=1e-4, lr_d=2e-4, beta1=0.5,
                beta2=0.99, d_width=2, width=8, redraw=True, eval_samples=25_600, lr_decay_from=1.0)


@pytest.mark.parametrize("script,extra", [(invert_gan, dict(n_dis=1)), (pgm_gan, dict(loss="standard", k=200, n_dis=1)),
                                          (maem_gan, dict(loss="ns", n_critic=1, lr_decay=1.0))])
@pytest.mark.parametrize("dataset", ["stacked-mnist", "stacked-fashion-mnist"])
def test_pacgan_presets_are_the_protocol(script, extra, dataset):
    args = script.parse_args(["--dataset", dataset, "--arch", "pacgan", "--out", "/tmp/unused"])
    for key, value in dict(PROTOCOL, **extra).items():
        assert getattr(args, key) == value, key
    channels = common.DATASETS[dataset]["channels"]
    nets = script.build_gan(args, channels) if script is pgm_gan else script.build_networks(args, channels)
    G, D = nets[0], nets[1]
    assert isinstance(G, common.PacGANGenerator) and isinstance(D, common.PacGANDiscriminator)
    assert [c.out_channels for c in D.convs] == [2, 4, 8] and common.has_batch_norm(D)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in D.modules())   # no spectral norm
    if script is invert_gan:
        assert isinstance(nets[2], common.PacGANEncoder)


@pytest.mark.parametrize("script", ["invert_gan.py", "pgm_gan.py", "maem_gan.py"])
@pytest.mark.parametrize("flags", [["--dataset", "cifar10", "--arch", "pacgan"],
                                   ["--dataset", "stacked-mnist", "--arch", "pacgan", "--img-size", "32"]])
def test_pacgan_bad_input_is_one_line(script, flags, tmp_path):
    write_mnist(str(tmp_path / "data"), n_train=50, n_test=10)         # data that loads: only the check stops it
    proc = run_script([script, *flags, "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "x")], timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.exists(tmp_path / "x")            # refused before anything is written


# ---------------------------------------------------------------- the redraw option
def test_redraw_gives_fresh_triplets_per_epoch_and_resumes_bit_exactly():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    ds = common.StackedDataset(images, labels, seed=3, redraw=True)
    rt = common.setup_runtime("cpu", seed=0)
    stream = common.BatchStream(ds, 16, rt, seed=5)
    trip = []
    for _ in range(3):                           # 3 epochs of 4 batches
        for _ in range(4):
            next(stream)
        trip.append(ds.triplets.clone())
    next(stream)                                 # epoch 3 starts
    assert ds.epoch == 3
    assert not torch.equal(trip[0], trip[1]) and not torch.equal(trip[1], trip[2])
    assert trip[0][:, 0].tolist() != list(range(64))   # independent uniform draws, not (i, p[i], q[i])
    # a resumed stream (state after 6 batches) gives the same batches as the uninterrupted one
    a = common.BatchStream(common.StackedDataset(images, labels, seed=3, redraw=True), 16, rt, seed=5)
    for _ in range(6):
        next(a)
    state = a.state_dict()
    b = common.BatchStream(common.StackedDataset(images, labels, seed=3, redraw=True), 16, rt, seed=5)
    b.load_state_dict(state)
    for _ in range(8):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # without redraw the triplets stay the fixed set
    fixed = common.StackedDataset(images, labels, seed=3)
    before = fixed.triplets.clone()
    fixed_stream = common.BatchStream(fixed, 16, rt, seed=5)
    for _ in range(9):
        next(fixed_stream)
    assert torch.equal(fixed.triplets, before)


# ---------------------------------------------------------------- the scripts end to end
def test_scripts_run_pacgan_end_to_end_and_sample_in_batches_of_128(tmp_path):
    root = str(tmp_path / "fmnist")
    write_mnist(root, n_train=300, n_test=50)
    common_flags = ["--dataset", "stacked-fashion-mnist", "--arch", "pacgan", "--data-root", root, "--device", "cpu",
                    "--steps", "3", "--log-every", "1", "--ckpt-every", "3", "--sample-every", "3"]
    runs = {"invert_gan": [*common_flags, "--batch-size", "16"],
            "maem_gan": [*common_flags, *bench_pacgan.SMOKE["maem_gan"], "--fig3-samples", "16"],
            "pgm_gan": [*common_flags, *bench_pacgan.SMOKE["pgm_gan"], "--eval-samples", "0"]}
    for script, flags in runs.items():
        out = str(tmp_path / script)
        proc = run_script([f"{script}.py", *flags, "--out", out], timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        mod = {"invert_gan": invert_gan, "pgm_gan": pgm_gan, "maem_gan": maem_gan}[script]
        ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
        if script == "maem_gan":      # the protocol's two learning rates reach the optimisers
            assert [g["lr"] for g in ck["opt_g"]["param_groups"]] == [1e-4]
            assert [g["lr"] for g in ck["opt_d"]["param_groups"]] == [2e-4]
        sample = mod.load_sampler(os.path.join(out, "ckpt.pt"))
        torch.manual_seed(1)
        x = sample(256)
        assert x.shape == (256, 3, 28, 28)
        if script in ("invert_gan", "maem_gan"):
            # BN on batch statistics in batches of 128: the second half alone gives the same samples
            G = mod.build_networks(argparse_ns(out), 3)[0]
            G.load_state_dict(torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["G"])
            torch.manual_seed(1)
            z = torch.randn(256, 256)
            with common.batch_norm_from_batch(G), torch.no_grad():
                assert torch.allclose(x[128:], G(z[128:]), atol=1e-6)
                assert not torch.allclose(x[:128], G(z[:64].repeat(2, 1))[:128], atol=1e-3)


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("script", [maem_gan, invert_gan, pgm_gan])
def test_the_pacgan_preset_trains_on_redrawn_triplets(script, monkeypatch, tmp_path):
    # main() hands the preset's redraw to the data (a fixed set of 60K triplets otherwise).
    seen = {}

    def fake_build_dataset(name, **kwargs):
        seen.update(kwargs, name=name)
        raise _Loaded

    monkeypatch.setattr(common, "build_dataset", fake_build_dataset)
    with pytest.raises(_Loaded):
        script.main(["--dataset", "stacked-fashion-mnist", "--arch", "pacgan", "--out", str(tmp_path / "x"),
                     "--device", "cpu"])
    assert seen["name"] == "stacked-fashion-mnist" and seen["redraw"] is True and seen["img_size"] == 28


def test_maem_bn_discriminator_sees_each_input_on_its_own():
    # A BN D on one concatenated batch would mix the fake batch's statistics into the real codes:
    # the real codes' mean (mu, no noise) must not depend on the fake batch.
    args = maem_gan.parse_args(["--dataset", "stacked-fashion-mnist", "--arch", "pacgan", "--m", "4",
                                "--batch-size", "8", "--out", "/tmp/unused"])
    torch.manual_seed(0)
    G, D = maem_gan.build_networks(args, 3)
    x = torch.rand(8, 3, 28, 28) * 2 - 1
    figures = []
    for seed in (1, 2):
        fake = G(torch.randn(8, 256, generator=torch.Generator().manual_seed(seed))).detach()
        buffers = maem_gan.make_buffers(args, 8, "cpu")
        torch.manual_seed(3)
        _, terms = maem_gan.d_step_loss(D, D, x, fake, args, buffers, ent_w=1.0)
        figures.append(float(terms["real_cos_batch"]))
    assert figures[0] == pytest.approx(figures[1], abs=1e-6)


def argparse_ns(out):
    import argparse
    return argparse.Namespace(**torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["args"])


# ---------------------------------------------------------------- the runner
ROWS = ["dcgan", "maem", "invert", "pgm"]


def table(out, results, root, clf, *extra):
    proc = run_script(["tests/bench_pacgan.py", "table", "--smoke", "--out", out, "--results", results,
                       "--data-root", root, "--classifier", clf, "--rows", *ROWS, "--seeds", "0", "--d-width", "2",
                       "--steps", "4", "--ckpt-every", "2", "--log-every", "1", "--jobs", "2", "--count-samples", "256",
                       *extra], timeout=600)
    return proc


def test_table_runs_counts_skips_and_resumes(tmp_path):
    root, out, results = str(tmp_path / "fmnist"), str(tmp_path / "runs"), str(tmp_path / "results")
    write_mnist(root, n_train=700, n_test=300)
    clf = str(tmp_path / "clf.pt")
    common.train_mode_classifier("fashion-mnist", clf, root=root, epochs=2, batch_size=16,
                                 calibration_samples=300, log=lambda *a: None)
    proc = table(out, results, root, clf)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {row: f"{row}-d2-n4-s0" for row in ROWS}
    recs = {}
    for row, name in names.items():
        rec = json.load(open(os.path.join(results, name + ".json")))
        missing = [f for f in bench_pacgan.RESULT_FIELDS if f not in rec]
        assert not missing, missing
        assert rec["row"] == row and rec["steps"] == 4 and rec["d_width"] == 2 and rec["samples"] == 256
        assert rec["classifier_sha256"] == common.file_sha256(clf)
        assert os.path.isfile(os.path.join(results, name + ".png"))
        recs[row] = rec
    # again: every run is done, nothing launched or counted, results unchanged
    stamp = {n: os.stat(os.path.join(results, n + ".json")).st_mtime_ns for n in names.values()}
    again = table(out, results, root, clf)
    lines = again.stdout.splitlines()
    assert again.returncode == 0 and not any(x.startswith(("$ ", "counted ")) for x in lines), again.stdout
    assert {n: os.stat(os.path.join(results, n + ".json")).st_mtime_ns for n in names.values()} == stamp
    # cut runs: stopped by --time-limit mid-training (the floor saves ckpt.pt on SIGTERM, the scripts
    # theirs), then continued by the same command: the floor from its ckpt.pt, invert with --resume
    cut = table(out, results, root, clf, "--rows", "dcgan", "invert", "--steps", "300", "--time-limit", "20")
    assert cut.returncode == 3, cut.stdout[-3000:]
    cut_names = {"dcgan": "dcgan-d2-n300-s0", "invert": "invert-d2-n300-s0"}
    # how far each run got depends on the machine's speed: a fast one may finish a run inside the
    # limit (never restarted then), a busy one may cut a run before its first checkpoint
    ns = argparse.Namespace(out=out, results=results, steps=300, count_samples=256, d_width=2, data_root=root,
                            ckpt_every=2, log_every=1, smoke=True)
    unfinished = {row for row in cut_names if not bench_pacgan.TableRun(row, 0, ns).trained()}
    assert unfinished, "--time-limit cut nothing"
    had_ckpt = {row: os.path.isfile(os.path.join(out, n, "ckpt.pt")) for row, n in cut_names.items()}
    rest = table(out, results, root, clf, "--rows", "dcgan", "invert", "--steps", "300")
    assert rest.returncode == 0, rest.stdout[-3000:]
    starts = [line for line in rest.stdout.splitlines() if line.startswith("$ ")]
    started = {row for row in cut_names if any(("invert_gan" if row == "invert" else "floor") in s for s in starts)}
    assert len(starts) == len(unfinished) and started == unfinished, (starts, unfinished)
    if "invert" in unfinished:
        inv_start = [s for s in starts if "invert_gan" in s][0]
        assert inv_start.endswith("--resume") == had_ckpt["invert"], inv_start
        steps = [json.loads(line)["step"] for line in open(os.path.join(out, cut_names["invert"], "log.jsonl"))]
        assert steps == list(range(1, 301))          # each step logged once: continued, not restarted
    if "dcgan" in unfinished and had_ckpt["dcgan"]:
        floor_log = open(os.path.join(out, "dcgan-d2-n300-s0.log")).read()
        assert "resumed at step" in floor_log and "finished 300 steps" in floor_log
    for name in cut_names.values():
        assert json.load(open(os.path.join(results, name + ".json")))["steps"] == 300
    summary = run_script(["tests/bench_pacgan.py", "table", "--summary", "--results", results], timeout=60)
    assert summary.returncode == 0 and "InvertGAN (p-norm)" in summary.stdout


def test_curve_counts_each_kept_generator_once_per_classifier(tmp_path, capsys):
    root, out = str(tmp_path / "fmnist"), str(tmp_path / "run")
    write_mnist(root, n_train=300, n_test=300)
    bench_pacgan.floor(argparse.Namespace(out=out, steps=4, seed=0, d_width=2, ckpt_every=2, log_every=2,
                                          data_root=root))
    clfs = []
    for i in range(2):
        clfs.append(str(tmp_path / f"clf{i}.pt"))
        torch.manual_seed(i)
        common.train_mode_classifier("fashion-mnist", clfs[i], root=root, epochs=1 + i, batch_size=16,
                                     calibration_samples=300, log=lambda *a: None)

    def curve(clf, every=1):
        capsys.readouterr()
        bench_pacgan.curve(argparse.Namespace(out=out, classifier=clf, count_samples=256, every=every,
                                              results=str(tmp_path / "results")))
        counted = [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()]
        return counted, json.load(open(os.path.join(out, "curve.json")))

    assert curve(clfs[0], every=4)[0] == [4]            # --every 4: the step-2 G is left for later
    counted, rec = curve(clfs[0])
    assert counted == [2] and [r["step"] for r in rec["rows"]] == [2, 4]
    m, _ = bench_pacgan.count(bench_pacgan.load_g(os.path.join(out, "g_000004.pt"))[0],
                              common.load_mode_classifier(clfs[0]), 256)
    assert rec["rows"][1]["modes_raw"] == m["modes_raw"] and rec["rows"][1]["kl_raw"] == m["kl_raw"]
    rec["rows"] = rec["rows"][1:]                       # a count lost (a cut run): only that one is redone
    common.write_json(os.path.join(out, "curve.json"), rec)
    assert curve(clfs[0])[0] == [2]
    assert curve(clfs[0])[0] == []                      # nothing new: nothing counted
    counted, rec = curve(clfs[1])                       # another classifier file: every G again
    assert counted == [2, 4]
    assert {r["protocol"]["classifier_sha256"] for r in rec["rows"]} == {common.file_sha256(clfs[1])}
    kept = json.load(open(tmp_path / "results" / "dcgan-d2-s0-curve.json"))     # the repository's copy
    assert kept["classifier_sha256"] == common.file_sha256(clfs[1]) and kept["trained_steps"] == 4
    logged = {r["step"]: r["d_loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl")))}
    assert [(r["step"], r["modes_raw"], r["d_loss"]) for r in kept["rows"]] == \
        [(r["step"], r["modes_raw"], logged[r["step"]]) for r in rec["rows"]]


def test_floor_fresh_z_changes_only_the_g_step(tmp_path):
    """`speed`'s dcgan-fresh-z row: the same D step as the protocol's floor, then G's step on a new z
    (the scripts' algorithm), so after one step D matches the protocol run and G does not."""
    root = str(tmp_path / "fmnist")
    write_mnist(root, n_train=300, n_test=10)
    state = {}
    for fresh in (False, True):
        out = str(tmp_path / f"fresh{fresh}")
        bench_pacgan.floor(argparse.Namespace(out=out, steps=1, seed=0, d_width=2, ckpt_every=1, log_every=1,
                                              data_root=root, fresh_z=fresh))
        state[fresh] = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    for k, v in state[False]["D"].items():      # D's weights (its BN statistics also see the G step's fakes)
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, state[True]["D"][k]), k
    assert any(not torch.equal(v, state[True]["G"][k]) for k, v in state[False]["G"].items()
               if v.is_floating_point())


def test_speed_table_pairs_each_round_with_its_own_floor():
    """Ratios are row step time / floor step time (floor rate / row rate), per round against the floor
    timed beside it, median over rounds; a failed run (None) drops its round only."""
    rates = {"maem": [5.0, 2.0, 4.0, None]}
    floors = {"maem": [10.0, 8.0, 12.0, 9.0]}
    line = bench_pacgan.speed_table(["maem"], rates, floors, 4).splitlines()[2]
    cells = [c.strip() for c in line.strip("|").split("|")]
    # rounds: 10/5 = 2.00, 8/2 = 4.00, 12/4 = 3.00 -> median 3.00x; rates median 4.00, floors median 10.00
    assert cells == ["maem", "4.00", "10.00", "3.00x", "2.00, 4.00, 3.00"]
    assert "| dcgan-script | - | - | - | - |" in bench_pacgan.speed_table(
        ["dcgan-script"], {"dcgan-script": [None]}, {"dcgan-script": [9.0]}, 1)
