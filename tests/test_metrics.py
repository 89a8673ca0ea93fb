"""Tests of common.py section 7 (metrics) and evaluate.py.

The FID Inception runs with *random* weights written in the standard file format (no download in
CI); a few small images per test keep the 299x299 forward passes cheap. The comparison with
pytorch-fid runs only where pytorch-fid is installed beside the project (it is no dependency).
"""

import math
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import evaluate  # noqa: E402
from bench_metrics import pytorch_fid_model, random_fid_weights  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_fid_weights(str(tmp_path_factory.mktemp("w") / "fid_random.pth"))


@pytest.fixture(scope="module")
def model(weights):
    return common.load_fid_inception(weights, "cpu")


def write_pngs(folder, n, size=16, seed=0):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i:03d}.png"))
    return folder


def cli(argv, capsys):
    """Run evaluate.py in-process as the command line does: (exit code, stdout, stderr)."""
    try:
        common.run_cli(evaluate.main, argv)
        code = 0
    except SystemExit as err:
        code = err.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------
# The network and its weights
# ------------------------------------------------------------------------------------------------
def test_state_dict_keys_equal_torchvision_inception3():
    # pytorch-fid's file is the state dict of torchvision's Inception3(num_classes=1008,
    # aux_logits=False) with patched blocks (same parameters): our keys and shapes must equal it.
    import torchvision

    ref = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                          init_weights=False).state_dict()
    ours = common.FIDInceptionV3().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_features_and_stats_equal_pytorch_fid(tmp_path, weights, model):
    pytest.importorskip("pytorch_fid")
    from PIL import Image
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

    folder = write_pngs(str(tmp_path / "img"), 4, size=20)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    ref_model = pytorch_fid_model(weights)
    ref_feat = get_activations(files, ref_model, batch_size=4, dims=2048, device="cpu", num_workers=0)
    mu_ref, sigma_ref = ref_feat.mean(0), np.cov(ref_feat, rowvar=False)   # pytorch-fid's stats
    scale = np.abs(ref_feat).max()
    plain = common.load_fid_inception(weights, "cpu", optimize=False)
    for m in (model, plain):                               # optimised and plain network
        feat, logits = common.inception_features(common.file_batches(files, 3), m, "cpu")
        assert np.abs(feat - ref_feat).max() <= 1e-5 * scale
        assert logits.shape == (4, 1008)
    # [-1, 1] float input gives the same features as the uint8 files.
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                     for f in files]).float() / 127.5 - 1
    feat_float, _ = common.inception_features([x], model, "cpu")
    assert np.abs(feat_float - ref_feat).max() <= 1e-5 * scale
    empty, _ = common.inception_features([torch.zeros(0)], model, "cpu")    # empty batch: no rows
    assert empty.shape == (0, 2048)
    # Statistics streamed over batches of 3 + 1, and FID (on a 64-d block: a 2048-d sqrtm is slow).
    stats = common.extract(common.file_batches(files, 3), model, "cpu", common.FeatureStats(),
                           progress=False).result()
    assert np.abs(stats["mu"] - mu_ref).max() <= 1e-5 * np.abs(mu_ref).max()
    assert np.abs(stats["sigma"] - sigma_ref).max() <= 1e-5 * np.abs(sigma_ref).max()
    mu2, s2 = mu_ref[:64] + 0.1, sigma_ref[:64, :64] + np.eye(64)
    ours = common.fid_from_stats(stats["mu"][:64], stats["sigma"][:64, :64], mu2, s2)
    theirs = calculate_frechet_distance(mu_ref[:64], sigma_ref[:64, :64], mu2, s2)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_weights_warning_and_bad_weights_files(tmp_path, weights, capsys):
    common.load_fid_inception(weights, "cpu")
    assert "not the standard FID Inception file" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(common.UsageError, match="not a PyTorch weights file"):
        common.load_fid_inception(str(junk))
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(common.UsageError, match="not an FID Inception state dict"):
        common.load_fid_inception(str(other))
    with pytest.raises(common.UsageError, match="no such file"):
        common.load_fid_inception(str(tmp_path / "missing.pth"))


def test_weights_lookup_offline_and_bad_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(common.UsageError) as err:
        common.fid_weights_path()
    assert common.FID_WEIGHTS_FILE in str(err.value) and "--inception-weights" in str(err.value)

    def wrong_file(url, dst, **kw):
        with open(dst, "wb") as f:
            f.write(b"some other file")

    monkeypatch.setattr(torch.hub, "download_url_to_file", wrong_file)
    with pytest.raises(common.UsageError, match="deleted"):
        common.fid_weights_path()
    assert not any((tmp_path / "hub" / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------------
# Scores against hand-computable values
# ------------------------------------------------------------------------------------------------
def test_fid_self_zero_and_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 16))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(common.fid_from_stats(mu, sigma, mu, sigma)) < 1e-9
    assert abs(common.fid_from_stats(mu, sigma, mu, sigma.copy() * (1 + 1e-15))) < 1e-9   # eigen path
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    d1, d2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert common.fid_from_stats(m1, np.diag(d1), m2, np.diag(d2)) == pytest.approx(closed, rel=1e-10)
    # Full covariances, and a singular S1 (fewer samples than dimensions: eigh fallback),
    # against scipy's sqrtm.
    from scipy import linalg

    def reference(m1, s1, m2, s2):
        return ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)

    b = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    s2 = np.cov(b, rowvar=False)
    singular = np.cov(rng.standard_normal((8, 16)), rowvar=False)
    for s1 in (sigma, singular):
        assert common.fid_from_stats(m1, s1, m2, s2) == pytest.approx(reference(m1, s1, m2, s2), rel=1e-6)
    with pytest.raises(common.UsageError):
        common.fid_from_stats(m1, sigma, m2[:3], sigma[:3, :3])


def one_hot_logits(labels, k=1008):
    logits = np.full((len(labels), k), -1e4)
    logits[np.arange(len(labels)), labels] = 0.0
    return logits


def test_inception_score_and_mode_score():
    mean, std = common.inception_score(np.zeros((100, 1008)))              # uniform predictor
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-9)
    perfect = one_hot_logits(np.arange(200) % 10)                          # 20 per split
    assert common.inception_score(perfect)[0] == pytest.approx(10.0)
    p_real = np.zeros(1008)
    p_real[:10] = 0.1
    assert common.mode_score(perfect, p_real) == pytest.approx(10.0)
    # Generated marginal on half the real classes: exp(log 5 - KL(p_g || p_real)) = 5 / 2.
    half = one_hot_logits(np.arange(200) % 5)
    assert common.mode_score(half, p_real) == pytest.approx(2.5)


def test_i_variance_forms():
    # Table 4 form: half the images say class 0, half class 1 -> std 0.5 on 2 classes, 0 on the
    # other 1006; averaged over classes.
    logits = one_hot_logits(np.arange(100) % 2)
    mean, std = common.i_variance(logits)
    assert mean == pytest.approx(2 * 0.5 / 1008) and std == pytest.approx(0.0, abs=1e-12)
    # Eq. 15: root mean squared distance to the mean.
    f = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert common.i_variance_eq15(f) == pytest.approx(math.sqrt(2.0))


def test_kid_pr_prd():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    mean, _ = common.kid(a, b, n_subsets=5, subset_size=200)
    assert abs(mean) < 0.01
    assert common.kid(a, b + 2, n_subsets=5, subset_size=200)[0] > 0.5
    assert common.precision_recall(a, a) == (1.0, 1.0)
    p, r = common.precision_recall(a + 5, b)
    assert p == 0.0 and r == 0.0
    f8, f1_8 = common.prd_scores(a, a, num_runs=2)
    assert f8 == pytest.approx(1.0, abs=1e-6) and f1_8 == pytest.approx(1.0, abs=1e-6)
    assert max(common.prd_scores(a + 10, b, num_runs=2)) < 0.05


def test_feature_stats_streaming_equals_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((103, 5)) * 3 + 1
    s = common.FeatureStats(keep_features=True, total=103, keep_rows=40)
    for i in range(0, 103, 25):
        s.add(x[i:i + 25], np.zeros((len(x[i:i + 25]), 4)))
    r = s.result()
    assert np.allclose(r["mu"], x.mean(0), atol=1e-12)
    assert np.allclose(r["sigma"], np.cov(x, rowvar=False), atol=1e-12)
    assert r["features"].shape == (40, 5) and r["p_y"] == pytest.approx(np.full(4, 0.25))


# ------------------------------------------------------------------------------------------------
# Mode coverage
# ------------------------------------------------------------------------------------------------
def test_mode_metrics_2d():
    centers, std = common.synthetic_modes("grid")
    pts = centers.repeat(4, 1).reshape(-1, 2).numpy()                      # 4 exact hits per mode
    m = common.mode_metrics_2d(pts, "grid")
    assert m == {"modes": 25, "hq_fraction": 1.0, "reverse_kl": pytest.approx(0.0, abs=1e-12)}
    one = np.repeat(centers[:1].numpy(), 50, 0)
    one[25:] += 3.5 * std                                                   # half of them too far
    m = common.mode_metrics_2d(one, "grid")
    assert m["modes"] == 1 and m["hq_fraction"] == 0.5
    assert m["reverse_kl"] == pytest.approx(math.log(25))
    assert common.mode_metrics_2d(np.zeros((3, 2)), "ring", data_std=10.0)["modes"] == 1


class DigitFromMean(torch.nn.Module):
    # Stub classifier: the digit is round(9 * brightness), brightness = mean pixel in [0, 1].
    def forward(self, x):
        digit = ((x.mean((1, 2, 3)) + 1) / 2 * 9).round().long().clamp(0, 9)
        return torch.nn.functional.one_hot(digit, 10).float()


def test_stacked_mode_metrics():
    levels = torch.arange(10).float() / 9 * 2 - 1                         # digit d -> level
    abc = torch.stack(torch.meshgrid(torch.arange(10), torch.arange(10), torch.arange(10),
                                     indexing="ij"), -1).reshape(-1, 3)     # all 1000 triplets
    images = levels[abc][:, :, None, None].expand(-1, -1, 8, 8)
    m = common.stacked_mode_metrics(images, DigitFromMean())
    assert m["modes"] == 1000 and m["reverse_kl"] == pytest.approx(0.0, abs=1e-12)
    m = common.stacked_mode_metrics(images[:1].repeat(7, 1, 1, 1), DigitFromMean())
    assert m["modes"] == 1 and m["reverse_kl"] == pytest.approx(math.log(1000))


def test_mode_classifier_file_roundtrip(tmp_path):
    path = str(tmp_path / "cls.pt")
    torch.save({"state_dict": common.ModeClassifier().state_dict(), "dataset": "mnist",
                "test_accuracy": 0.1}, path)
    clf = common.load_mode_classifier(path)
    assert clf(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(common.UsageError, match="not a mode classifier"):
        common.load_mode_classifier(__file__)


# ------------------------------------------------------------------------------------------------
# evaluate.py
# ------------------------------------------------------------------------------------------------
def test_cli_images_stats_fid(tmp_path, weights, capsys):
    import json

    gen = write_pngs(str(tmp_path / "gen"), 10, seed=1)                   # IS needs 10 (splits)
    real = write_pngs(str(tmp_path / "real"), 4, seed=2)
    w = ["--inception-weights", weights, "--device", "cpu", "--quiet"]
    stats = str(tmp_path / "real.npz")
    code, out, err = cli(["stats", real, "--out", stats] + w, capsys)
    assert code == 0, err
    out_json = str(tmp_path / "m.json")
    # (PRD needs 20 images per set for its 20 clusters: tested on features in test_kid_pr_prd.)
    # (FID is left to the `fid` call below: with 4 and 10 images both covariances are singular
    # and each 2048-d FID takes the slower eigendecomposition path.)
    code, out, err = cli(["images", gen, "--real", stats, "--metrics", "is,ms,kid,pr,ivar",
                          "--json", out_json] + w, capsys)
    assert code == 0, err
    res = json.load(open(out_json))
    assert set(res) == {"is_mean", "is_std", "mode_score", "kid_mean", "kid_std", "precision",
                        "recall", "ivar_mean", "ivar_std", "ivar_eq15"}
    assert all(key in out for key in res) and res["is_mean"] >= 1
    code, out, _ = cli(["fid", stats, stats, "--json", out_json], capsys)    # a set with itself
    assert code == 0 and "FID:" in out and json.load(open(out_json))["fid"] == 0.0
    try:
        from pytorch_fid.fid_score import compute_statistics_of_path
    except ImportError:
        return
    mu, sigma = compute_statistics_of_path(stats, None, 1, 2048, "cpu")      # pytorch-fid reads ours
    assert np.array_equal(mu, np.load(stats)["mu"]) and sigma.shape == (2048, 2048)


def test_cli_points(tmp_path, capsys):
    centers, _ = common.synthetic_modes("ring")
    path = str(tmp_path / "p.npy")
    np.save(path, centers.repeat(3, 1).reshape(-1, 2).numpy())
    code, out, err = cli(["points", path, "--dataset", "ring", "--json", str(tmp_path / "p.json")], capsys)
    assert code == 0, err
    assert "modes" in out and "8" in out


def test_cli_bad_input_exit_2(tmp_path, weights, capsys):
    w = ["--inception-weights", weights, "--device", "cpu", "--quiet"]
    empty = tmp_path / "empty"
    empty.mkdir()
    stats = tmp_path / "nomu.npz"
    np.savez(stats, x=np.zeros(3))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG not really")
    linear = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), linear)
    good = write_pngs(str(tmp_path / "good"), 2)
    np.savez(tmp_path / "fid-only.npz", mu=np.zeros(2048), sigma=np.eye(2048))   # pytorch-fid's format
    cases = [
        (["images", str(empty), "--real", str(empty)] + w, "no images"),
        (["images", str(corrupt), "--real", good, "--metrics", "fid"] + w, "broken.png"),
        (["fid", str(stats), str(stats)], "no 'mu' and 'sigma'"),
        (["fid", good, good, "--inception-weights", str(linear), "--quiet"], "not an FID Inception"),
        (["images", good, "--real", "nonsense", "--metrics", "fid"] + w, "neither"),
        (["images", good, "--real", good, "--metrics", "fid,bogus"] + w, "unknown metric"),
        (["images", good, "--real", str(tmp_path / "fid-only.npz"), "--metrics", "kid"] + w,
         "need real features"),
        (["points", str(stats), "--dataset", "ring"], "(N, 2) array"),
        (["ckpt", str(linear)], "names no known method"),
    ]
    for argv, message in cases:
        code, out, err = cli(argv, capsys)
        assert code == 2, (argv, err)
        errors = [line for line in err.splitlines() if not line.startswith("warning:")]
        assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0], (argv, err)


def test_cli_subprocess_exit_code(tmp_path):
    # The real command line: one clear line on stderr, exit code 2, no traceback.
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "images", str(empty),
                           "--real", str(empty)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
