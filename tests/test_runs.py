"""Tests of a run's life around training (common.RunControl and friends): Ctrl-C and SIGTERM save
and resume bit-for-bit, under torchrun too; short runs keep a checkpoint; train_seconds add up;
failing downloads, NaN stops and corrupt checkpoints say the truth in one line; the console and
--help say what the user needs."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import evaluate
import invert_gan
import maem_gan
import pgm_gan
from conftest import ROOT, run_script, run_torchrun
from test_common import write_mnist
from test_pgm_gan import IMG_FLAGS, TINY_2D, without

RING = ["--dataset", "ring", "--log-every", "10", "--ckpt-every", "100", "--sample-every", "1000",
        "--eval-samples", "500", "--device", "cpu"]


def log_lines(out, sub=""):
    return [json.loads(x) for x in open(os.path.join(out, sub, "log.jsonl"))]


def same_log(a, b):
    """log.jsonl of two runs equal but for the measured speed."""
    la, lb = log_lines(a), log_lines(b)
    return len(la) == len(lb) and all(dict(x, it_s=0) == dict(y, it_s=0) for x, y in zip(la, lb))


def same_weights(a, b, nets):
    ca, cb = (common.load_checkpoint(os.path.join(out, "ckpt.pt")) for out in (a, b))
    return ca["step"] == cb["step"] and all(torch.equal(ca[n][k], cb[n][k]) for n in nets for k in ca[n])


def popen(argv, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pre = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    # A pytest started in the background inherits SIGINT ignored, and a run keeps an ignored
    # signal ignored (as Python does): the child gets the default back, as a shell's job would.
    return subprocess.Popen([sys.executable, *pre, *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def kill(proc):
    """A run that hangs: it and its torchrun workers (their own sessions) are killed."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    for pid in children.split():
        os.kill(int(pid), signal.SIGKILL)
    proc.kill()
    return proc.communicate()


def wait_for_log(proc, out, timeout=240):
    """Until the run has written its first log line: it is training, mid-run."""
    path, end = os.path.join(out, "log.jsonl"), time.time() + timeout
    while not (os.path.isfile(path) and os.path.getsize(path)):
        assert proc.poll() is None, proc.communicate()
        if time.time() > end:
            pytest.fail(f"no log line: {kill(proc)}")
        time.sleep(0.02)


def stderr_at_end(proc, timeout=240):
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not stop: {kill(proc)}")


def stop_after(monkeypatch, module, name, call, signum=signal.SIGINT):
    """Deliver `signum` (as the signal handler does) during the `call`-th call of module.name: in
    the middle of a known step, without timing."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            common._on_stop_signal(signum, None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return lambda: monkeypatch.setattr(module, name, real)


# ---------------------------------------------------------------- Ctrl-C and SIGTERM
def test_sigint_mid_training_saves_and_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    flags = [*RING, "--steps", "200"]
    proc = popen(["invert_gan.py", *flags, "--out", part])
    wait_for_log(proc, part)
    proc.send_signal(signal.SIGINT)
    err = stderr_at_end(proc)
    assert proc.returncode == 130, err
    step = common.load_checkpoint(os.path.join(part, "ckpt.pt"))["step"]
    assert 10 <= step < 200
    assert err.strip() == (f"interrupted at step {step} of 200; saved {os.path.join(part, 'ckpt.pt')}; "
                           "continue with --resume")
    assert not os.path.exists(os.path.join(part, "ckpt.pt.tmp"))
    invert_gan.main([*flags, "--out", part, "--resume"])
    assert f"resuming at step {step} of 200" in capsys.readouterr().out
    invert_gan.main([*flags, "--out", full])
    assert same_weights(full, part, ("G", "D", "F")) and same_log(full, part)


def test_a_stop_between_log_steps_resumes_with_the_same_log(tmp_path, monkeypatch, capsys):
    # Stopped during G step 5 of 12 (log every 4): the loss sums of steps 5 (and 6-8 after the
    # resume) make the step-8 line, as in a run that never stopped.
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    flags = [*RING, "--steps", "12", "--log-every", "4", "--ckpt-every", "8", "--ema", "0.5"]
    invert_gan.main([*flags, "--out", full])
    undo = stop_after(monkeypatch, invert_gan, "consistency_loss", 5)
    with pytest.raises(SystemExit) as stop:
        invert_gan.main([*flags, "--out", part])
    undo()
    assert stop.value.code == 130
    assert common.load_checkpoint(os.path.join(part, "ckpt.pt"))["step"] == 5
    assert "interrupted at step 5 of 12" in capsys.readouterr().err
    invert_gan.main([*flags, "--out", part, "--resume"])
    assert same_weights(full, part, ("G", "D", "F", "G_ema")) and same_log(full, part)


def test_sigterm_to_torchrun_saves_one_checkpoint_from_which_both_ranks_resume(tmp_path):
    # torchrun itself gets SIGTERM (a scheduler's preemption) and passes it to every worker.
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    flags = [*RING, "--steps", "60", "--batch-size", "64"]
    proc = popen(["invert_gan.py", *flags, "--out", part], torchrun=True)
    wait_for_log(proc, part)
    proc.send_signal(signal.SIGTERM)
    err = stderr_at_end(proc)
    ckpt = common.load_checkpoint(os.path.join(part, "ckpt.pt"))
    step = ckpt["step"]
    assert 10 <= step < 60 and len(ckpt["rng"]) == 2 and len(ckpt["run"]["meter"]) == 2
    lines = [x for x in err.splitlines() if x.startswith("interrupted")]
    assert lines == [f"interrupted at step {step} of 60; saved {os.path.join(part, 'ckpt.pt')}; "
                     "continue with --resume"], err[-3000:]
    assert sorted(os.listdir(part)) == ["args.json", "ckpt.pt", "log.jsonl", "samples"]
    # torchrun prints its own traceback of the stopped job; no worker prints one, nor a warning
    assert 'common.py", line' not in err and "Warning" not in err, err[-3000:]
    resumed = run_torchrun(2, ["invert_gan.py", *flags, "--out", part, "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_torchrun(2, ["invert_gan.py", *flags, "--out", full], timeout=300).returncode == 0
    assert same_weights(full, part, ("G", "D", "F")) and same_log(full, part)


def test_sigterm_to_one_torchrun_worker_stops_both_after_the_same_step(tmp_path):
    # Only rank 1 gets the signal: rank 0 learns of it from the collective, and both write their
    # part of the same step's checkpoint (RNG streams, replay buffers) and exit 143.
    out = str(tmp_path / "job")
    proc = popen(["maem_gan.py", *RING, "--steps", "400", "--batch-size", "32", "--buffer-size", "64",
                  "--out", out], torchrun=True)
    wait_for_log(proc, out)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [pid for pid in workers
             if b"\0LOCAL_RANK=1\0" in b"\0" + open(f"/proc/{pid}/environ", "rb").read()]
    assert len(rank1) == 1, workers
    os.kill(int(rank1[0]), signal.SIGTERM)
    err = stderr_at_end(proc)
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="maem_gan")
    assert 10 <= ckpt["step"] < 400 and len(ckpt["buffers"]) == 2 and len(ckpt["rng"]) == 2
    assert sum(x.startswith(f"interrupted at step {ckpt['step']} of 400") for x in err.splitlines()) == 1
    assert err.count("exitcode  : 143") == 2, err[-3000:]          # rank 0 too, never signalled


def test_second_sigint_aborts_at_once_and_leaves_no_torn_checkpoint(tmp_path, monkeypatch):
    # The second Ctrl-C lands in the middle of writing the checkpoint: the previous one stays.
    out = str(tmp_path / "run")
    invert_gan.main([*RING, "--steps", "10", "--out", out])
    real_save = torch.save

    def save_then_ctrl_c(obj, path, *a, **kw):
        real_save(obj, path, *a, **kw)
        common._on_stop_signal(signal.SIGINT, None)              # the first: stop after this step
        common._on_stop_signal(signal.SIGINT, None)              # the second: at once

    monkeypatch.setattr(torch, "save", save_then_ctrl_c)
    with pytest.raises(common.Interrupted) as err:
        invert_gan.main([*RING, "--steps", "20", "--out", out, "--resume"])
    monkeypatch.setattr(torch, "save", real_save)
    assert err.value.second and err.value.signum == signal.SIGINT
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 10
    assert os.listdir(out).count("ckpt.pt.tmp") == 0


def test_a_signal_outside_the_training_loop_stops_at_once_with_one_line(tmp_path, capsys):
    out = str(tmp_path / "run")

    def main(argv):
        invert_gan.main([*RING, "--steps", "10", "--out", out])
        os.kill(os.getpid(), signal.SIGINT)                        # after training, while evaluating
        time.sleep(30)

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)   # not ignored (background pytest)
    try:
        previous = signal.getsignal(signal.SIGINT)
        with pytest.raises(SystemExit) as err:
            common.run_cli(main)
        assert err.value.code == 130 and signal.getsignal(signal.SIGINT) is previous
    finally:
        signal.signal(signal.SIGINT, outer)
    assert capsys.readouterr().err.strip() == (f"interrupted by SIGINT; {os.path.join(out, 'ckpt.pt')} "
                                               "holds step 10 of 10; --resume continues from it")


def test_pgm_pretext_stop_resumes_and_a_stopped_partition_runs_again(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "mnist")
    write_mnist(root, n_train=24)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    flags = ["--dataset", "stacked-mnist", "--data-root", root,
             *without(IMG_FLAGS, "--pretext-steps", "--ckpt-every"), "--pretext-steps", "4",
             "--ckpt-every", "4", "--steps", "2"]
    pgm_gan.main([*flags, "--out", full, "--stage", "pretext"])
    undo = stop_after(monkeypatch, common, "nt_xent", 2, signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        pgm_gan.main([*flags, "--out", part, "--stage", "pretext"])
    undo()
    assert stop.value.code == 143 and "interrupted at pretext step 2 of 4" in capsys.readouterr().err
    with pytest.raises(common.UsageError, match="stopped at step 2 of 4: finish it with --resume"):
        pgm_gan.main([*flags, "--out", part, "--stage", "partition"])
    pgm_gan.main([*flags, "--out", part, "--stage", "pretext", "--resume"])
    a, b = (common.load_checkpoint(os.path.join(out, "pretext.pt")) for out in (full, part))
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["phi"][k], b["phi"][k]) for k in a["phi"])
    assert same_log(os.path.join(full, "pretext"), os.path.join(part, "pretext"))
    # The partition stage is saved only whole: a stop leaves no partition.pt, --resume runs it again.
    ring = str(tmp_path / "ring")
    undo = stop_after(monkeypatch, pgm_gan, "partition_loss", 2)
    with pytest.raises(SystemExit) as stop:
        pgm_gan.main([*TINY_2D, "--out", ring])
    undo()
    assert stop.value.code == 130 and not os.path.exists(os.path.join(ring, "partition.pt"))
    assert ("interrupted at partition step 2 of 4; the partition stage is saved only when it is done: "
            "run the command again") in capsys.readouterr().err    # 2-D: no pretext.pt to --resume from
    pgm_gan.main([*TINY_2D, "--out", ring])
    assert common.load_checkpoint(os.path.join(ring, "ckpt.pt"))["step"] == 6


# ---------------------------------------------------------------- checkpoints and time
@pytest.mark.parametrize("script", ["invert_gan", "maem_gan", "pgm_gan"])
def test_a_run_shorter_than_ckpt_every_leaves_a_checkpoint(tmp_path, script):
    out = str(tmp_path / script)
    flags = ([*without(TINY_2D, "--ckpt-every", "--log-every", "--steps")] if script == "pgm_gan"
             else [*without(RING, "--ckpt-every", "--log-every")])
    {"invert_gan": invert_gan, "maem_gan": maem_gan, "pgm_gan": pgm_gan}[script].main(
        [*flags, "--steps", "5", "--log-every", "1", "--ckpt-every", "1000", "--out", out])
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 5


def test_train_seconds_add_up_over_resumes(tmp_path):
    out = str(tmp_path / "run")
    flags = [*RING, "--lr-decay-from", "1", "--out", out]
    invert_gan.main([*flags, "--steps", "20"])
    first = json.load(open(os.path.join(out, "metrics.json")))["train_seconds"]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["run"]["train_seconds"] == pytest.approx(first, abs=0.06)
    ckpt["run"]["train_seconds"] = 1000.0           # as if the first 20 steps had taken 1000 s
    common.save_checkpoint(os.path.join(out, "ckpt.pt"), ckpt)
    invert_gan.main([*flags, "--steps", "40", "--resume"])
    total = json.load(open(os.path.join(out, "metrics.json")))["train_seconds"]
    assert 1000.0 < total < 1060.0
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["run"]["train_seconds"] == \
        pytest.approx(total, abs=0.06)
    # A finished run resumed: evaluated again, not trained, and the total is kept.
    before = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    invert_gan.main([*flags, "--steps", "40", "--resume"])
    assert json.load(open(os.path.join(out, "metrics.json")))["train_seconds"] == total
    after = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert after["step"] == 40 and all(torch.equal(before["G"][k], after["G"][k]) for k in before["G"])


# ---------------------------------------------------------------- messages that say the truth
def test_nan_stop_names_only_files_that_exist(tmp_path):
    # The command (lr 1e4: NaN at once), before and after a checkpoint exists.
    for name, extra in (("none", ["--log-every", "100", "--ckpt-every", "500"]),
                        ("some", ["--log-every", "1", "--ckpt-every", "1"])):
        out = str(tmp_path / name)
        with pytest.raises(common.UsageError, match="non-finite") as err:
            invert_gan.main(["--dataset", "ring", "--lr", "1e4", "--steps", "400", "--device", "cpu",
                             "--out", out, *extra])
        named = re.findall(re.escape(out) + r"[^\s,;()]*", str(err.value))
        assert all(os.path.isfile(path) for path in named), (str(err.value), os.listdir(out))
        assert ("no checkpoint was written" in str(err.value)) == (name == "none")
        assert (len(named) == 1) == (name == "some")


def test_failing_download_gives_one_line_exit_2_and_leaves_nothing(tmp_path, monkeypatch):
    # An unreachable mirror (nothing listens on port 9) stands for a machine without a network.
    fresh = str(tmp_path / "fresh" / "mnist")
    code = ("import torchvision, common, maem_gan\n"
            "torchvision.datasets.MNIST.mirrors = ['http://127.0.0.1:9/']\n"
            "common.run_cli(maem_gan.main)\n")
    proc = run_script(["-c", code, "--dataset", "stacked-mnist", "--download", "--data-root", fresh,
                       "--out", str(tmp_path / "run")], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --download of mnist failed"), proc.stderr
    assert "train-images-idx3-ubyte.gz" in lines[0] and "without --download" in lines[0]
    assert not os.path.exists(tmp_path / "fresh") and not os.path.exists(tmp_path / "run")
    # In a folder that exists, only what the attempt created goes.
    import torchvision

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("not the attempt's")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(common.UsageError, match="--download of cifar10 failed .*cifar-10-batches-py"):
        common.build_dataset("cifar10", root=str(kept), download=True)
    assert os.listdir(kept) == ["mine.txt"]


def test_corrupt_checkpoint_says_what_to_do(tmp_path):
    out = str(tmp_path / "run")
    invert_gan.main([*RING, "--steps", "10", "--out", out])
    path = os.path.join(out, "ckpt.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])                  # a copy cut short
    with pytest.raises(common.UsageError) as err:
        invert_gan.main([*RING, "--steps", "20", "--out", out, "--resume"])
    text = str(err.value)
    assert "\n" not in text and f"cannot read checkpoint {path}" in text and "truncated or corrupt" in text
    assert "older copy" in text and "deleted to start the run again without --resume" in text


# ---------------------------------------------------------------- the console and --help
def test_first_speed_line_gpu_note_and_results_console_only(tmp_path, monkeypatch, capsys):
    from test_common import write_cifar

    quiet, early = str(tmp_path / "quiet"), str(tmp_path / "early")
    flags = [*RING, "--steps", "20", "--log-every", "10"]
    invert_gan.main([*flags, "--out", quiet])
    capsys.readouterr()
    monkeypatch.setattr(common.RunControl, "FIRST_LINE_SECONDS", 0.0)
    invert_gan.main([*flags, "--out", early])
    printed = capsys.readouterr().out.splitlines()
    first = [i for i, x in enumerate(printed) if re.match(r"step 1/20 \| [\d.e+-]+ it/s \| eta ", x)]
    logged = [i for i, x in enumerate(printed) if x.startswith("step 10/20 | cons")]
    assert len(first) == 1 and first[0] < logged[0]
    assert printed[-1] == (f"results in {early}: metrics.json, ckpt.pt, log.jsonl, samples/ (1 picture)")
    assert same_log(quiet, early)                                  # the console line is not logged
    # An image preset on the CPU that would take hours: said once, with the flag that shortens it.
    write_cifar(str(tmp_path / "data"), "cifar10", n=8)
    monkeypatch.setattr(common.RunControl, "GPU_NOTE_SECONDS", 0.0)
    invert_gan.main(["--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--width", "8",
                     "--batch-size", "4", "--steps", "3", "--log-every", "3", "--ckpt-every", "3",
                     "--sample-every", "3", "--eval-samples", "4", "--device", "cpu",
                     "--inception-weights", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "img")])
    notes = [x for x in capsys.readouterr().out.splitlines() if "sized for a GPU" in x]
    assert len(notes) == 1 and "a smaller --steps" in notes[0]


@pytest.mark.parametrize("script", ["invert_gan", "maem_gan", "pgm_gan"])
def test_help_shows_presets_once_and_no_empty_defaults(script, capsys):
    with pytest.raises(SystemExit):
        {"invert_gan": invert_gan, "maem_gan": maem_gan, "pgm_gan": pgm_gan}[script].parse_args(["--help"])
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "presets (flags left unset" in text and "ring: " in text
    assert re.search(r"default[^()]*\) \(default:", text) is None      # never a second default
    assert "depends on the dataset" in text and "OMP_NUM_THREADS" in text


def test_threads_one_for_2d_presets_unless_the_user_says(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert invert_gan.parse_args(["--dataset", "ring"]).threads == 1
    assert pgm_gan.parse_args(["--dataset", "grid"]).threads == 1
    assert invert_gan.parse_args(["--dataset", "cifar10"]).threads == 0
    assert invert_gan.parse_args(["--dataset", "ring", "--threads", "3"]).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert maem_gan.parse_args(["--dataset", "ring"]).threads == 0
    before = torch.get_num_threads()
    try:
        common.setup_runtime("cpu", threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_under_torchrun_a_bad_flag_prints_once_per_node_and_every_rank_exits_2(monkeypatch, capsys,
                                                                              local_rank):
    # Every rank meets the same bad flag; only local rank 0 prints it, all exit 2 (torchrun's own
    # summary then lists exit code 2 and no traceback of ours).
    monkeypatch.setenv("RANK", local_rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    for argv in (["--dataset", "ring", "--bogus"], ["--dataset", "ring", "--lr", "nan"]):
        with pytest.raises(SystemExit) as err:
            common.run_cli(invert_gan.main, argv)
        assert err.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == (local_rank == "0")


# ---------------------------------------------------------------- evaluate.py ckpt
def test_stacked_counts_agree_run_ckpt_and_saved_samples(tmp_path, capsys):
    # Issue 29, "done when": a run's metrics.json, evaluate.py ckpt on its checkpoint and
    # evaluate.py modes on the PNGs ckpt saved count under one protocol (N, classifier), and ckpt
    # and modes give the very same numbers on the same images. Default N: 25,600 everywhere.
    from test_metrics import cli

    assert (maem_gan.PRESETS["stacked-fashion-mnist"]["eval_samples"]
            == pgm_gan.PRESETS["stacked-fashion-mnist"]["eval_samples"] == common.STACKED_SAMPLES == 25_600)
    assert evaluate.build_parser().parse_args(["classifier", "--dataset", "mnist", "--out", "x"]
                                              ).calibration_samples == common.STACKED_SAMPLES
    write_mnist(str(tmp_path / "data"), n_train=8, n_test=4)
    classifier = str(tmp_path / "cls.pt")
    torch.manual_seed(0)
    common.save_mode_classifier(classifier, common.ModeClassifier(), dataset="mnist", test_accuracy=0.5)
    out = str(tmp_path / "run")
    maem_gan.main(["--dataset", "stacked-mnist", "--data-root", str(tmp_path / "data"), "--width", "4",
                   "--batch-size", "4", "--steps", "2", "--n-critic", "1", "--log-every", "1",
                   "--ckpt-every", "2", "--sample-every", "2", "--fig3-samples", "12", "--m", "4",
                   "--eval-samples", "40", "--classifier", classifier, "--device", "cpu", "--out", out])
    run = json.load(open(os.path.join(out, "metrics.json")))
    pngs, a, b = str(tmp_path / "pngs"), str(tmp_path / "a.json"), str(tmp_path / "b.json")
    code, _, err = cli(["ckpt", os.path.join(out, "ckpt.pt"), "--classifier", classifier, "--n", "40",
                        "--save-samples", pngs, "--json", a, "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    code, _, err = cli(["modes", pngs, "--dataset", "stacked-mnist", "--classifier", classifier,
                        "--json", b, "--device", "cpu"], capsys)
    assert code == 0, err
    ckpt, modes = json.load(open(a)), json.load(open(b))
    assert ckpt == modes
    assert run["protocol"] == ckpt["protocol"]
    assert ckpt["protocol"]["samples"] == 40 and ckpt["protocol"]["classifier_sha256"] == common.file_sha256(classifier)
    # Without --n, a stacked checkpoint is counted on 25,600 samples.
    seen = []
    real = common.stacked_mode_metrics

    def counting(batches, *args, **kw):
        seen.append(sum(len(x) for x in batches))
        return {"modes": 0}

    common.stacked_mode_metrics = counting
    try:
        code, _, err = cli(["ckpt", os.path.join(out, "ckpt.pt"), "--classifier", classifier,
                            "--device", "cpu", "--quiet"], capsys)
    finally:
        common.stacked_mode_metrics = real
    assert code == 0 and seen == [25_600], err


def test_evaluate_ckpt_fid_of_a_stacked_run_without_real(tmp_path, capsys):
    from bench_metrics import random_fid_weights
    from test_metrics import cli

    write_mnist(str(tmp_path / "data"), n_train=8, n_test=4)
    out = str(tmp_path / "img")
    maem_gan.main(["--dataset", "stacked-mnist", "--data-root", str(tmp_path / "data"), "--width", "4",
                   "--batch-size", "4", "--steps", "2", "--n-critic", "1", "--log-every", "1",
                   "--ckpt-every", "2", "--sample-every", "2", "--fig3-samples", "12", "--m", "4",
                   "--eval-samples", "8", "--device", "cpu", "--out", out])
    weights = random_fid_weights(str(tmp_path / "w.pth"))
    classifier = str(tmp_path / "cls.pt")
    common.save_mode_classifier(classifier, common.ModeClassifier(), dataset="mnist")
    w = ["--inception-weights", weights, "--device", "cpu", "--quiet", "--stats-cache", str(tmp_path / "c"),
         "--n", "10"]
    ckpt = os.path.join(out, "ckpt.pt")
    for extra, keys in ((["--classifier", classifier], {"fid", "modes"}), ([], {"fid"})):
        res = str(tmp_path / "m.json")
        code, _, err = cli(["ckpt", ckpt, "--metrics", "fid", "--json", res, *extra] + w, capsys)
        assert code == 0, err
        got = json.load(open(res))
        assert keys <= set(got) and ("modes" in got) == ("modes" in keys)
        assert "8 real" in got["protocol"]["fid"]                  # the run's own 8 training images
        if "modes" in keys:                                           # both protocols kept
            assert got["protocol"]["modes"]["classifier_sha256"] == common.file_sha256(classifier)
    ring = str(tmp_path / "ring")
    invert_gan.main([*RING, "--steps", "2", "--out", ring])
    code, _, err = cli(["ckpt", os.path.join(ring, "ckpt.pt"), "--metrics", "fid"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "2-D data" in err


@pytest.mark.parametrize("script", ["invert_gan", "maem_gan", "pgm_gan"])
def test_evaluate_ckpt_reproduces_a_2d_runs_metrics_json_exactly(tmp_path, script):
    # Same n, default seed, same device: every key evaluate.py reports equals the run's own
    # (reverse_kl_hq, the within-mode figures and MMD included; PGMGAN's acceptance and forced).
    out = str(tmp_path / script)
    flags = ([*without(TINY_2D, "--eval-samples")] if script == "pgm_gan"
             else [*without(RING, "--eval-samples"), "--steps", "20"])
    {"invert_gan": invert_gan, "maem_gan": maem_gan, "pgm_gan": pgm_gan}[script].main(
        [*flags, "--eval-samples", "3000", "--out", out])
    proc = run_script(["evaluate.py", "ckpt", os.path.join(out, "ckpt.pt"), "--n", "3000", "--device", "cpu",
                       "--quiet", "--json", str(tmp_path / "m.json")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, run = json.load(open(tmp_path / "m.json")), json.load(open(os.path.join(out, "metrics.json")))
    keys = set(common.mode_metrics_2d(np.zeros((2, 2)), "ring")) | (
        {"acceptance", "forced"} if script == "pgm_gan" else set())
    assert set(got) == keys and {k: run[k] for k in keys} == got
