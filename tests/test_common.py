"""Tests of common.py sections 0-5: errors, runtime, checkpoints, logging, pictures, datasets.

Every loader is fed small files that the tests write in the real on-disk formats (IDX .gz,
CIFAR pickle batches, STL-10 binaries, CelebA's folder + partition file, image folders).
"""

import gzip
import json
import math
import os
import pickle
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, run_torchrun


# ---------------------------------------------------------------- writers of the real formats
def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def write_mnist(root, n_train=30, n_test=10, gz=True, seed=0):
    """Four IDX files; image i is filled with the value 20 * label so tests can read labels off."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = np.repeat(labels[:, None, None] * 20, 28 * 28, 1).reshape(n, 28, 28)
        images[:, 0, 0] = 255                       # one bright pixel: an orientation check
        ext = ".gz" if gz else ""
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}"), images)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
        out[prefix] = (images, labels)
    return out


# ---------------------------------------------------------------- 2-D synthetic data
def test_ring_and_grid_centres_counts_and_std():
    centers, std = common.synthetic_modes("ring")
    assert centers.shape == (8, 2) and std == 0.01
    assert torch.allclose(centers.norm(dim=1), torch.full((8,), 2.0), atol=1e-6)
    # (2cos, 2sin) at multiples of pi/4: the first is (2, 0), the third (0, 2)
    assert torch.allclose(centers[0], torch.tensor([2.0, 0.0]), atol=1e-6)
    assert torch.allclose(centers[2], torch.tensor([0.0, 2.0]), atol=1e-6)
    grid, gstd = common.synthetic_modes("grid")
    assert grid.shape == (25, 2) and gstd == 0.05
    assert set(map(tuple, grid.int().tolist())) == {(2 * i, 2 * j) for i in range(-2, 3) for j in range(-2, 3)}

    ds = common.build_dataset("grid", n_points=10_000, seed=1)
    x, y = ds.points, ds.labels
    assert x.shape == (10_000, 2) and torch.bincount(y).tolist() == [400] * 25
    resid = x - grid[y]
    assert abs(resid.std().item() - 0.05) < 0.003          # the std of the mixture components
    again = common.build_dataset("grid", n_points=10_000, seed=1)
    assert torch.equal(again.points, x)                     # fixed seed: the same training set
    wide = common.build_dataset("ring", n_points=800, data_std=0.2)
    assert abs((wide.points - centers[wide.labels]).std().item() - 0.2) < 0.03


def test_unknown_dataset_is_a_usage_error():
    with pytest.raises(common.UsageError, match="unknown dataset 'nope'"):
        common.build_dataset("nope")


# ---------------------------------------------------------------- MNIST-like + stacked
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_idx_files(tmp_path, layout):
    root = str(tmp_path)
    files_dir = root if layout == "flat" else os.path.join(root, "FashionMNIST", "raw")
    written = write_mnist(files_dir, gz=(layout == "flat"))
    ds = common.build_dataset("fashion-mnist", root=root)
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert y == written["train"][1][3]
    assert math.isclose(x[0, 5, 5].item(), written["train"][1][3] * 20 / 127.5 - 1, abs_tol=1e-6)
    assert x[0, 0, 0].item() == 1.0 and len(ds) == 30
    assert len(common.build_dataset("fashion-mnist", root=root, split="test")) == 10
    assert len(common.build_dataset("fashion-mnist", root=root, split="all")) == 40


def test_stacked_labels_are_100a_10b_c(tmp_path):
    written = write_mnist(str(tmp_path), n_train=50)
    base_labels = written["train"][1]
    ds = common.build_dataset("stacked-fashion-mnist", root=str(tmp_path), seed=5)
    assert len(ds) == 50
    x, y = ds.get_batch(torch.arange(50))
    assert x.shape == (50, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    # Each channel is a flat image of value 20*label (away from the bright corner), so the
    # channel's label can be read off its centre pixel and must match the stacked label.
    digits = ((x[:, :, 16, 16] + 1) * 127.5 / 20).round().long()            # (50, 3)
    assert torch.equal(y, digits[:, 0] * 100 + digits[:, 1] * 10 + digits[:, 2])
    assert torch.equal(digits[:, 0], torch.as_tensor(base_labels))          # R = item i itself
    assert len(set(y.tolist())) > 10                                         # really mixed
    x0, y0 = ds[7]
    assert torch.equal(x0, x[7]) and y0 == y[7]
    other = common.build_dataset("stacked-fashion-mnist", root=str(tmp_path), seed=6)
    assert not torch.equal(other.labels, ds.labels)                          # seed picks triplets


def test_missing_and_corrupt_idx_files(tmp_path):
    with pytest.raises(common.UsageError, match="no mnist files"):
        common.build_dataset("mnist", root=str(tmp_path))
    with pytest.raises(common.UsageError, match="does not exist"):
        common.build_dataset("mnist", root=str(tmp_path / "absent"))
    write_mnist(str(tmp_path))
    with open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"not a gzip file")
    with pytest.raises(common.UsageError, match="train-images-idx3-ubyte.gz"):
        common.build_dataset("mnist", root=str(tmp_path))


def test_real_fashion_mnist_if_installed():
    if not os.path.isdir(common.FASHION_MNIST_SYSTEM_DIR):
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    ds = common.build_dataset("fashion-mnist", split="test")
    assert len(ds) == 10_000 and sorted(set(ds.labels.tolist())) == list(range(10))


# ---------------------------------------------------------------- CIFAR / STL-10
def write_cifar(root, name, n=12):
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    key = "labels" if name == "cifar10" else "fine_labels"
    written = {}
    for fname in files:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10 if name == "cifar10" else 100, n).tolist()
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump({"data": data, key: labels}, f, protocol=2)
        written[fname] = (data, labels)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_pickle_batches(tmp_path, name):
    written = write_cifar(str(tmp_path), name)
    ds = common.build_dataset(name, root=str(tmp_path))
    first = "data_batch_1" if name == "cifar10" else "train"
    assert len(ds) == (60 if name == "cifar10" else 12)
    x, y = ds[1]
    data, labels = written[first]
    expected = torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 127.5 - 1
    assert torch.allclose(x, expected) and y == labels[1]
    assert len(common.build_dataset(name, root=str(tmp_path), split="test")) == 12
    assert len(common.build_dataset(name, root=str(tmp_path), split="all")) == len(ds) + 12
    up = common.build_dataset(name, root=str(tmp_path), img_size=64)
    assert up[0][0].shape == (3, 64, 64)


def test_stl10_binary_orientation_and_resize(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    img = np.zeros((2, 3, 96, 96), dtype=np.uint8)
    img[:, :, :48, :] = 255                     # top half bright: a row-vs-column check
    img.transpose(0, 1, 3, 2).tofile(folder / "train_X.bin")   # the files are column-major
    np.array([1, 10], dtype=np.uint8).tofile(folder / "train_y.bin")
    img[:, :, :, :] = 0
    img[:1].transpose(0, 1, 3, 2).tofile(folder / "unlabeled_X.bin")
    ds = common.build_dataset("stl10", root=str(tmp_path))
    assert len(ds) == 3
    x, y = ds[0]
    assert x.shape == (3, 48, 48) and y == 0
    assert x[:, :20].min() > 0.99 and x[:, 28:].max() < -0.99
    assert ds[1][1] == 9 and ds[2][1] == -1                      # unlabeled -> -1


# ---------------------------------------------------------------- folders and CelebA
def write_png(path, colour, size=(40, 30)):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_labels_crop_resize_and_errors(tmp_path):
    write_png(str(tmp_path / "cats" / "a.png"), (255, 0, 0))
    write_png(str(tmp_path / "dogs" / "b.jpg"), (0, 0, 255))
    write_png(str(tmp_path / "dogs" / "deep" / "c.png"), (0, 255, 0))
    ds = common.build_dataset("folder", root=str(tmp_path), img_size=16)
    assert len(ds) == 3
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0 and x[0].mean() > 0.99 and x[2].mean() < -0.99
    assert [ds[i][1] for i in range(3)] == [0, 1, 1]
    with open(tmp_path / "dogs" / "broken.png", "wb") as f:
        f.write(b"\x89PNG not really")
    ds = common.build_dataset("folder", root=str(tmp_path), img_size=16)
    bad = [i for i, f in enumerate(ds.files) if f.endswith("broken.png")][0]
    with pytest.raises(common.UsageError, match="broken.png"):
        ds[bad]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(common.UsageError, match="holds no images"):
        common.build_dataset("folder", root=str(empty))


def test_celeba_layout_and_partition(tmp_path):
    img_dir = tmp_path / "celeba" / "img_align_celeba"
    for i in range(1, 5):
        write_png(str(img_dir / f"{i:06d}.jpg"), (10 * i, 0, 0), size=(178, 218))
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n")
    ds = common.build_dataset("celeba", root=str(tmp_path), img_size=32)
    assert len(ds) == 2 and ds[0][0].shape == (3, 32, 32)
    assert len(common.build_dataset("celeba", root=str(tmp_path), split="test", img_size=32)) == 1


def test_corrupt_image_stops_the_stream_with_its_name(tmp_path):
    write_png(str(tmp_path / "a.png"), (1, 2, 3))
    (tmp_path / "z.png").write_bytes(b"junk")
    rt = common.setup_runtime("cpu")
    stream = common.BatchStream(common.build_dataset("folder", root=str(tmp_path), img_size=8),
                                2, rt, num_workers=1)
    with pytest.raises(common.UsageError) as err:
        next(stream)
    assert "z.png" in str(err.value) and "\n" not in str(err.value)


def test_file_backed_stream_leaves_the_global_rng_alone(tmp_path):
    # A DataLoader draws its workers' base seed from the global RNG at each epoch start unless it has
    # its own generator; a resumed run starts its epoch at another moment, so it was not bit-exact.
    for i in range(4):
        write_png(str(tmp_path / f"{i}.png"), (40 * i, 2, 3))
    rt = common.setup_runtime("cpu")
    stream = common.BatchStream(common.build_dataset("folder", root=str(tmp_path), img_size=8), 2, rt)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    for _ in range(5):                                          # three epoch starts
        next(stream)
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- batch stream
class FakeRT:
    """A Runtime stand-in for one rank of a 2-process job (no process group needed)."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")


def test_batch_stream_epochs_ranks_and_resume():
    ds = common.PointDataset(torch.arange(20.0).view(10, 2), torch.arange(10))
    one = common.BatchStream(ds, 4, FakeRT(0, 1), seed=1)
    assert one.steps_per_epoch == 2                                   # 10 samples, 2 full batches
    first_epoch = torch.cat([next(one)[1] for _ in range(2)])
    assert len(set(first_epoch.tolist())) == 8 and one.epoch == 0
    next(one)
    assert one.epoch == 1                                             # rolled over, reshuffled
    # two ranks split each global batch into disjoint halves
    r0 = common.BatchStream(ds, 4, FakeRT(0, 2), seed=1)
    r1 = common.BatchStream(ds, 4, FakeRT(1, 2), seed=1)
    a, b = next(r0)[1], next(r1)[1]
    assert len(a) == len(b) == 2 and not set(a.tolist()) & set(b.tolist())
    # resume mid-epoch: a fresh stream loaded with the state continues with the same batches
    s = common.BatchStream(ds, 4, FakeRT(0, 1), seed=1)
    for _ in range(3):
        next(s)
    state = s.state_dict()
    expected = [next(s)[1].tolist() for _ in range(4)]
    t = common.BatchStream(ds, 4, FakeRT(0, 1), seed=1)
    t.load_state_dict(state)
    assert [next(t)[1].tolist() for _ in range(4)] == expected
    with pytest.raises(common.UsageError, match="not divisible by the world size 2"):
        common.BatchStream(ds, 5, FakeRT(0, 2))
    with pytest.raises(common.UsageError, match="fewer than one batch"):
        common.BatchStream(ds, 64, FakeRT(0, 1))


# ---------------------------------------------------------------- runtime
def test_runtime_choices_and_errors():
    rt = common.setup_runtime("cpu", amp="bf16")
    assert rt.device.type == "cpu" and rt.is_main and rt.scaler is None and not rt.distributed
    with rt.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with common.setup_runtime("cpu").autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(common.UsageError, match="fp16 needs a CUDA device"):
        common.setup_runtime("cpu", amp="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(common.UsageError, match="no CUDA device"):
            common.setup_runtime("cuda")


def test_seeds_same_weights_then_per_rank_noise():
    common.setup_runtime("cpu", seed=11)
    a = torch.nn.Linear(3, 3).weight.detach().clone()
    common.setup_runtime("cpu", seed=11)
    b = torch.nn.Linear(3, 3).weight.detach().clone()
    assert torch.equal(a, b)
    common.seed_rank(FakeRT(0, 2), 11)
    n0 = torch.randn(4)
    common.seed_rank(FakeRT(1, 2), 11)
    n1 = torch.randn(4)
    assert not torch.equal(n0, n1)


def test_run_cli_turns_usage_errors_into_exit_code_2():
    code = ("import common\n"
            "def main(argv):\n"
            "    raise common.UsageError('unknown dataset \\'x\\'')\n"
            "common.run_cli(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown dataset 'x'"
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- checkpoints and RNG
def test_checkpoint_round_trip_atomic_and_method_check(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, {"method": "demo", "step": 7, "net": net.state_dict(),
                                  "opt": opt.state_dict(), "rng": [common.rng_state()],
                                  "buffer": torch.arange(5.0), "args": {"lr": 1e-3, "name": "x"}})
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    ckpt = common.load_checkpoint(path, method="demo")
    assert ckpt["step"] == 7 and torch.equal(ckpt["buffer"], torch.arange(5.0))
    other = torch.nn.Linear(3, 2)
    common.load_state(other, ckpt["net"], "network")
    assert torch.equal(other.weight, net.weight)
    opt2 = torch.optim.Adam(other.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(common.UsageError, match="checkpoint of 'demo', not of 'maem_gan'"):
        common.load_checkpoint(path, method="maem_gan")
    with pytest.raises(common.UsageError, match="does not fit this network"):
        common.load_state(torch.nn.Linear(5, 2), ckpt["net"], "network", str(path))
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(common.UsageError, match="cannot read checkpoint"):
        common.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(common.UsageError, match="no checkpoint"):
        common.load_checkpoint(tmp_path / "absent.pt")


def test_rng_state_restores_every_generator_bit_for_bit(tmp_path):
    common.seed_everything(5)
    random.random(), np.random.rand(), torch.rand(1)
    common.save_checkpoint(tmp_path / "r.pt", {"rng": common.rng_state()})
    expected = (random.random(), np.random.rand(3).tolist(), torch.randn(3).tolist(),
                np.random.randn(), random.gauss(0, 1))
    common.seed_everything(99)                                   # scramble everything
    common.set_rng_state(common.load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.rand(3).tolist(), torch.randn(3).tolist(),
           np.random.randn(), random.gauss(0, 1))
    assert got == expected


# ---------------------------------------------------------------- logging
def test_out_dir_logger_and_loss_meter(tmp_path, capsys):
    out = str(tmp_path / "run")
    common.prepare_out_dir(out, {"dataset": "ring", "steps": 10}, resume=False, is_main=True)
    assert json.load(open(os.path.join(out, "args.json")))["dataset"] == "ring"
    rt = common.setup_runtime("cpu")
    meter = common.LossMeter(rt)
    log = common.Logger(out, True, total_steps=10)
    for step in range(1, 11):
        meter.add(d_loss=torch.tensor(float(step)), g_loss=1.0)
        if step % 5 == 0:
            means, finite = meter.flush()
            assert finite
            log.log(step, means, lr=1e-4)
    lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [x["step"] for x in lines] == [5, 10]
    assert lines[0]["d_loss"] == 3.0 and lines[1]["d_loss"] == 8.0 and lines[0]["lr"] == 1e-4
    assert "it_s" in lines[0]
    printed = capsys.readouterr().out
    assert "step 10/10" in printed and "it/s" in printed and "eta" in printed
    # a resumed run from step 5 drops the lines the stopped run wrote after its checkpoint
    common.Logger(out, True, total_steps=10, start_step=5)
    assert [json.loads(x)["step"] for x in open(os.path.join(out, "log.jsonl"))] == [5]
    meter.add(d_loss=torch.tensor(float("nan")))
    assert meter.flush()[1] is False
    # an existing run is never overwritten without --resume
    open(os.path.join(out, "ckpt.pt"), "wb").close()
    with pytest.raises(common.UsageError, match="already holds a run"):
        common.prepare_out_dir(out, {}, resume=False, is_main=True)
    with pytest.raises(common.UsageError, match="no checkpoint"):
        common.prepare_out_dir(str(tmp_path / "new"), {}, resume=True, is_main=True)


def test_loss_meter_sums_numbers_on_the_host_and_saves_copies():
    # Python numbers stay on the host (no copy to the device per step), tensors on the device:
    # a "meta" device stands in for a GPU (the old meter moved every number there).
    meter = common.LossMeter(common.Runtime(device=torch.device("meta")))
    meter.add(d_loss=torch.ones((), device="meta"), lam=0.5)
    assert meter.sums["d_loss"].device.type == "meta" and meter.sums["lam"].device.type == "cpu"
    # The same float32 sums as on the device, and a saved state is a copy that later steps leave alone.
    rt = common.setup_runtime("cpu")
    meter, whole = common.LossMeter(rt), common.LossMeter(rt)
    for i in range(3):
        for m in (meter, whole):
            m.add(g_loss=torch.tensor(0.1 * i), lam=0.1)
    saved = meter.state_dict()
    meter.add(g_loss=torch.tensor(5.0), lam=7.0)
    assert saved["lam"][0].item() == (torch.tensor(0.1) + 0.1 + 0.1).item() and saved["lam"][1] == 3
    resumed = common.LossMeter(rt)
    resumed.load_state_dict(saved)
    for m in (resumed, whole):
        m.add(g_loss=torch.tensor(5.0), lam=7.0)
    assert resumed.flush() == whole.flush() == meter.flush()


# ---------------------------------------------------------------- pictures
def test_scatter_plot_and_grid(tmp_path):
    centers, _ = common.synthetic_modes("ring")
    img = common.plot_points([(centers.numpy(), common.REAL_COLOR),
                              (centers.numpy() * 0.5, np.arange(8))],
                             common.extent_for("ring"), size=200, title="ring", centers=centers)
    px = np.asarray(img)
    assert img.size == (200 + 2 * 24, 200 + 24 + 22)
    assert (px == np.array(common.REAL_COLOR)).all(-1).sum() > 8        # real points drawn
    assert (px == np.array(common.PALETTE[1])).all(-1).sum() > 0        # label-coloured points
    bars = common.plot_bars([0.5, 0.25, 0.25], reference=1 / 3)
    heat = common.plot_heatmap(np.outer(np.arange(5), np.arange(5)), (-1, 1, -1, 1), size=50)
    common.hconcat([img, bars, heat], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
    common.save_image_grid(torch.rand(4, 3, 8, 8) * 2 - 1, tmp_path / "grid.png")
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)


# ---------------------------------------------------------------- torchrun, 2 processes, gloo
def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    proc = run_torchrun(2, [os.path.join(ROOT, "tests", "ddp_probe.py"), "--out", str(tmp_path)],
                        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "ddp.json"))
    assert result["world_size"] == 2
    assert result["init_max_diff"] == 0.0                   # same initial weights on both ranks
    assert result["moved"] > 1e-3                           # training really changed them
    assert result["final_max_diff"] < 1e-6                  # and DDP kept them identical
    assert result["per_rank_batch"] == [32, 32]             # global batch 64 split in two
    assert result["noise_differs"]                          # per-rank noise streams


# ---------------------------------------------------------------- reliability of runs
def test_torn_last_log_line_is_dropped_on_resume(tmp_path, capsys):
    out = str(tmp_path)
    path = os.path.join(out, "log.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 5, "d_loss": 1.0}\n{"step": 10, "d_loss": 0.5}\n{"step": 15, "d_lo')
    common.Logger(out, True, total_steps=20, start_step=10)
    assert [json.loads(x)["step"] for x in open(path)] == [5, 10]
    assert "dropped the torn last line" in capsys.readouterr().out
    with open(path, "w") as f:                       # damage anywhere else is not a torn write
        f.write('{"step": 5}\n{"step": 1\n{"step": 10}\n')
    with pytest.raises(common.UsageError, match="line 2 is not JSON"):
        common.Logger(out, True, total_steps=20, start_step=10)


def test_nan_weights_never_become_the_last_good_checkpoint(tmp_path, monkeypatch):
    # Weights can turn non-finite in the update *after* the last finite loss was logged; the
    # checkpoint of that step must not be written, and the message must name the one on disk.
    import invert_gan

    out = str(tmp_path / "run")
    real = common.training_state

    def poisoned(method, args, step, nets, *rest, **kw):
        if step == 20:
            with torch.no_grad():
                next(common.unwrap(nets["G"]).parameters()).fill_(float("nan"))
        return real(method, args, step, nets, *rest, **kw)

    monkeypatch.setattr(common, "training_state", poisoned)
    argv = ["--dataset", "ring", "--steps", "20", "--log-every", "10", "--ckpt-every", "10",
            "--sample-every", "20", "--eval-samples", "100", "--device", "cpu", "--out", out]
    with pytest.raises(common.UsageError) as err:
        invert_gan.main(argv)
    assert "non-finite weights in G" in str(err.value) and "at step 20" in str(err.value)
    assert "last good checkpoint" in str(err.value) and "(step 10)" in str(err.value)
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 10
    # With no checkpoint yet, the message says so instead of naming a missing file.
    out2 = str(tmp_path / "run2")
    with pytest.raises(common.UsageError, match="no checkpoint was written before it"):
        invert_gan.main([*argv[:-1], out2, "--ckpt-every", "20", "--log-every", "20"])


def test_resume_names_the_flags_it_ignores(tmp_path, capsys):
    import argparse

    out = str(tmp_path)
    common.save_checkpoint(os.path.join(out, "ckpt.pt"), {
        "method": "m", "args": {"dataset": "ring", "lr": 0.001, "steps": 5, "out": out, "resume": False}})
    args = argparse.Namespace(dataset="ring", lr=0.01, steps=10, out=out, resume=True)
    common.restore_saved_args(args, "m", ("steps", "out", "resume"))
    assert args.lr == 0.001 and args.steps == 10
    line = capsys.readouterr().out
    assert "ignored: --lr 0.01 (kept 0.001)" in line and "--dataset" not in line and "--steps" not in line


# ---------------------------------------------------------------- common.py's contents list
def common_sections():
    """(number, name, first line, last line) of each `# ====` / `# N. Name` / `# ====` section of
    common.py, as the file stands: a section runs from its opening marker to the line before the
    next section's."""
    lines = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "common.py")).read().split("\n")
    marker = "# " + "=" * 20
    starts = [(i + 1, *re.match(r"# (\d+)\. (.+)$", lines[i + 1]).groups()) for i in range(len(lines) - 2)
              if lines[i].startswith(marker) and lines[i + 2].startswith(marker) and re.match(r"# \d+\. ", lines[i + 1])]
    ends = [s[0] - 1 for s in starts[1:]] + ["END"]
    return [(int(n), name.strip(), first, last) for (first, n, name), last in zip(starts, ends)]


def test_common_contents_list_gives_each_sections_true_line_range():
    listed = [(int(n), name, int(first), last if last == "END" else int(last))
              for n, name, first, last in re.findall(r"(?m)^    (\d+)\. (\w[\w ]*?)\s+(\d+)-(\d+|END)\s", common.__doc__)]
    actual = common_sections()
    table = "\n".join(f"    {n}. {name:<15} {first}-{last}" for n, name, first, last in actual)
    assert listed == actual, f"common.py's contents list is out of date; the sections are now:\n{table}"
