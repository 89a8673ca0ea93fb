"""Tests of invert_gan.py: each loss against its equation, then the real script on tiny settings."""

import json
import math
import os

import numpy as np
import pytest
import torch

import common
import invert_gan
from conftest import ROOT, run_script, run_torchrun, run_until_crash

TINY = ["--steps", "20", "--log-every", "10", "--ckpt-every", "20", "--sample-every", "20",
        "--eval-samples", "2000", "--device", "cpu"]


# ---------------------------------------------------------------- Gaussian losses (Eq. 6-9, 11)
def spd(l, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(l, l, generator=g, dtype=torch.float64)
    return a @ a.T / l + 0.3 * torch.eye(l, dtype=torch.float64)


def test_pnorm_hand_values():
    eye = torch.eye(2)
    # ||(3, 4)||_2 + ||I - I||_2 = 5
    assert invert_gan.gaussian_loss("pnorm", torch.tensor([3.0, 4.0]), eye).item() == pytest.approx(5.0)
    # mu = 0, Sigma - I = [[1, 2], [2, 0]]: p=2 -> sqrt(1 + 4 + 4) = 3; p=1 -> 5; p=3 -> 17^(1/3)
    sigma = torch.tensor([[2.0, 2.0], [2.0, 1.0]])
    zero = torch.zeros(2)
    assert invert_gan.gaussian_loss("pnorm", zero, sigma, p=2).item() == pytest.approx(3.0)
    assert invert_gan.gaussian_loss("pnorm", zero, sigma, p=1).item() == pytest.approx(5.0)
    assert invert_gan.gaussian_loss("pnorm", zero, sigma, p=3).item() == pytest.approx(17 ** (1 / 3))
    # p = 1 on the mean: |1| + |-2| = 3 (absolute values, see the comment at Eq. 8)
    assert invert_gan.gaussian_loss("pnorm", torch.tensor([1.0, -2.0]), eye, p=1).item() == pytest.approx(3.0)


def test_w2_matches_the_closed_form_with_scipy_sqrtm():
    from scipy.linalg import sqrtm

    for seed, l in ((0, 2), (1, 5), (2, 20)):
        sigma = spd(l, seed)
        mu = torch.linspace(-1, 1, l, dtype=torch.float64)
        # W2(N(mu, S), N(0, I))^2 = ||mu||^2 + tr(S + I - 2 (I^1/2 S I^1/2)^1/2)
        ref = math.sqrt(float(mu @ mu) + float(np.trace(sigma.numpy() + np.eye(l)
                                                         - 2 * sqrtm(sigma.numpy()).real)))
        got = invert_gan.gaussian_loss("w2", mu, sigma, eps=1e-12).item()
        assert got == pytest.approx(ref, rel=1e-8)


def test_kl_matches_torch_distributions():
    from torch.distributions import MultivariateNormal, kl_divergence

    for seed, l in ((0, 2), (3, 6), (4, 20)):
        sigma = spd(l, seed)
        mu = torch.linspace(-0.5, 1.5, l, dtype=torch.float64)
        # Eq. 7 is KL(P_z || P_z~) with P_z = N(0, I)
        ref = kl_divergence(MultivariateNormal(torch.zeros(l, dtype=torch.float64), torch.eye(l, dtype=torch.float64)),
                            MultivariateNormal(mu, sigma)).item()
        got = invert_gan.gaussian_loss("kl", mu, sigma, eps=1e-12).item()
        assert got == pytest.approx(ref, rel=1e-8)


def test_w2_1d_hand_value():
    # Eq. 11: sqrt(||mu||^2 + ||sigma - 1||^2); mu=(1, 0), stds (2, 1) -> sqrt(1 + 1)
    got = invert_gan.gaussian_loss("w2-1d", torch.tensor([1.0, 0.0]), torch.diag(torch.tensor([4.0, 1.0])))
    assert got.item() == pytest.approx(math.sqrt(2), rel=1e-6)
    # it only sees the diagonal: a strong correlation costs nothing (the paper's point, Sec. 4.2)
    corr = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    assert invert_gan.gaussian_loss("w2-1d", torch.zeros(2), corr, eps=1e-12).item() < 1e-5
    assert invert_gan.gaussian_loss("pnorm", torch.zeros(2), corr).item() > 1.0


@pytest.mark.parametrize("kind", ["pnorm", "w2", "kl", "w2-1d"])
def test_every_gaussian_loss_is_zero_at_the_standard_normal(kind):
    for l in (2, 20):
        assert invert_gan.gaussian_loss(kind, torch.zeros(l), torch.eye(l), eps=1e-12).item() == pytest.approx(0, abs=1e-5)
        assert invert_gan.gaussian_loss(kind, 0.3 * torch.ones(l), 2 * torch.eye(l), eps=1e-12).item() > 0.1


@pytest.mark.parametrize("kind", ["pnorm", "w2", "kl", "w2-1d"])
def test_gaussian_losses_are_finite_for_a_collapsed_batch(kind):
    # every code equal -> Sigma = 0 (singular), repeated eigenvalues: values and gradients finite
    z = torch.ones(16, 4, requires_grad=True)
    mu, sigma = invert_gan.batch_gaussian(z * torch.tensor([1.0, 2.0, 3.0, 4.0]))
    loss = invert_gan.gaussian_loss(kind, mu, sigma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_batch_gaussian_is_the_unbiased_mean_and_covariance():
    z = torch.randn(50, 3)
    mu, sigma = invert_gan.batch_gaussian(z)
    assert torch.allclose(mu, z.mean(0)) and torch.allclose(sigma, torch.cov(z.T), atol=1e-6)


# ---------------------------------------------------------------- consistency (Eq. 5) and GAN (Eq. 4)
def test_consistency_loss_is_zero_for_an_exact_inverse_and_an_l2_norm_otherwise():
    A = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    G = lambda z: z @ A.T                     # noqa: E731  an invertible linear "generator"
    F = lambda x: x @ torch.linalg.inv(A).T   # noqa: E731  its exact inverse
    z, x = torch.randn(64, 2), torch.randn(64, 2)
    assert invert_gan.consistency_loss(z, F(G(z)), x, G(F(x))).item() == pytest.approx(0, abs=1e-5)
    # offsets (3, 4) on every code and (0, 1) on every image: ||.||_2 = 5 and 1 -> 6 (not squared)
    got = invert_gan.consistency_loss(z, z + torch.tensor([3.0, 4.0]), x, x + torch.tensor([0.0, 1.0]))
    assert got.item() == pytest.approx(6.0, rel=1e-6)


def test_gan_losses_against_log_sigmoid_by_hand():
    d_real, d_fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    expected_d = -(torch.log(sig(d_real)).mean() + torch.log(1 - sig(d_fake)).mean())
    assert invert_gan.gan_loss_d(d_real, d_fake).item() == pytest.approx(expected_d.item(), rel=1e-6)
    assert invert_gan.gan_loss_g(d_fake).item() == pytest.approx(-torch.log(sig(d_fake)).mean().item(), rel=1e-6)


# ---------------------------------------------------------------- the script, end to end
@pytest.mark.parametrize("loss", invert_gan.GAUSS_LOSSES)
def test_every_gauss_loss_trains_on_ring_without_nan(tmp_path, loss):
    out = str(tmp_path / loss)
    invert_gan.main(["--dataset", "ring", "--gauss-loss", loss, "--out", out, *TINY])
    lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [x["step"] for x in lines] == [10, 20]
    assert all(math.isfinite(v) for x in lines for k, v in x.items() if isinstance(v, float))
    if loss not in ("none",):
        assert lines[-1]["gauss"] > 0                         # the Gaussian term is really on
    if loss == "zdisc":
        assert "dz_loss" in lines[-1]                         # and D_z is trained (App. A.1)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert {"modes", "hq_fraction", "reverse_kl"} <= set(metrics)
    assert os.path.isfile(os.path.join(out, "samples", "step_0000020.png"))
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="invert_gan")
    assert ckpt["step"] == 20 and (ckpt["Dz"] is not None) == (loss == "zdisc")


def test_plain_gan_baseline_flags_switch_the_extra_losses_off(tmp_path):
    out = str(tmp_path / "gan")
    invert_gan.main(["--dataset", "grid", "--lambda-cons", "0", "--gauss-loss", "none", "--out", out, *TINY])
    last = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))][-1]
    assert last["gauss"] == 0.0 and last["cons"] > 0          # cons is still reported, weight 0


@pytest.mark.parametrize("mode", ["crash", "extend"])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, mode):
    """crash: the default schedule (lr decay over the second half of --steps) plus an EMA of G,
    killed right after the step-20 checkpoint and resumed with the same --steps. extend: a
    constant-lr run of 20 steps continued to 40 (the lr schedule does not depend on --steps)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common_flags = ["--dataset", "ring", "--log-every", "10", "--ckpt-every", "10", "--sample-every", "40",
                    "--eval-samples", "1000", "--device", "cpu", "--seed", "3"]
    common_flags += ["--ema", "0.9", "--ema-start", "5"] if mode == "crash" else ["--lr-decay-from", "1"]
    invert_gan.main([*common_flags, "--steps", "40", "--out", full])
    if mode == "crash":
        run_until_crash(monkeypatch, invert_gan.main, [*common_flags, "--steps", "40", "--out", part],
                        lambda state: state["step"] == 20)
    else:
        invert_gan.main([*common_flags, "--steps", "20", "--out", part])
    invert_gan.main([*common_flags, "--steps", "40", "--out", part, "--resume"])
    a = common.load_checkpoint(os.path.join(full, "ckpt.pt"))
    b = common.load_checkpoint(os.path.join(part, "ckpt.pt"))
    for net in ("G", "D", "F") + (("G_ema",) if mode == "crash" else ()):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
    assert a["opt_gf"]["state"][0]["exp_avg"].equal(b["opt_gf"]["state"][0]["exp_avg"])
    lines = [json.loads(x) for x in open(os.path.join(part, "log.jsonl"))]
    assert [x["step"] for x in lines] == [10, 20, 30, 40]
    if mode == "crash":        # lr of each interval's last step: 1e-3 until step 20, then linear to 0
        assert [x["lr"] for x in lines] == pytest.approx([1e-3, 1e-3, 0.55e-3, 0.05e-3])
    assert json.load(open(os.path.join(full, "metrics.json")))["modes"] == \
        json.load(open(os.path.join(part, "metrics.json")))["modes"]


def test_lr_factor_is_constant_then_linear_to_zero():
    f = common.lr_factor
    assert [f(s, 100, 0.5) for s in (0, 49, 50, 75, 99)] == pytest.approx([1, 1, 1, 0.5, 0.02])
    assert [f(s, 100, 1.0) for s in (0, 99)] == [1.0, 1.0]
    assert [f(s, 100, 0.0) for s in (0, 50, 99)] == pytest.approx([1, 0.5, 0.01])


def test_ema_generator_is_what_metrics_and_load_sampler_use(tmp_path):
    out = str(tmp_path / "ema")
    invert_gan.main(["--dataset", "ring", "--steps", "20", "--log-every", "10", "--ckpt-every", "20",
                     "--sample-every", "20", "--eval-samples", "500", "--device", "cpu", "--ema", "0.5",
                     "--out", out])
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert any(not torch.equal(ckpt["G"][k], ckpt["G_ema"][k]) for k in ckpt["G"])
    sample = invert_gan.load_sampler(os.path.join(out, "ckpt.pt"))
    G, _, _, _ = invert_gan.build_networks(invert_gan.parse_args(["--dataset", "ring"]),
                                           common.DATASETS["ring"]["channels"])
    G.load_state_dict(ckpt["G_ema"])
    torch.manual_seed(0)
    got = sample(100)
    torch.manual_seed(0)
    with torch.no_grad():
        want = G.eval()(torch.randn(100, 2))
    assert torch.allclose(got.detach(), want)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = invert_gan.consistency_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        value = real(*args)
        return value * float("nan") if calls["n"] > 25 else value

    monkeypatch.setattr(invert_gan, "consistency_loss", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(common.UsageError, match="non-finite loss at step 30"):
        invert_gan.main(["--dataset", "ring", "--steps", "40", "--log-every", "10", "--ckpt-every", "20",
                         "--sample-every", "40", "--out", out, "--device", "cpu"])
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 20
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_tiny_image_run_end_to_end_and_load_sampler(tmp_path):
    from test_common import write_cifar

    write_cifar(str(tmp_path / "data"), "cifar10", n=8)
    out = str(tmp_path / "img")
    proc = run_script(["invert_gan.py", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                       "--width", "8", "--batch-size", "4", "--steps", "4", "--log-every", "2",
                       "--ckpt-every", "4", "--sample-every", "4", "--eval-samples", "8",
                       "--inception-weights", str(tmp_path / "absent.pth"), "--out", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(os.path.join(out, "samples", "step_0000004.png"))
    assert "image metrics skipped" in proc.stdout
    sample = invert_gan.load_sampler(os.path.join(out, "ckpt.pt"))
    x = sample(5)
    assert x.shape == (5, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_torchrun_two_processes_on_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    proc = run_torchrun(2, ["invert_gan.py", "--dataset", "ring", "--out", out, *TINY], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="invert_gan")
    assert ckpt["step"] == 20 and len(ckpt["rng"]) == 2         # both ranks' RNG streams saved
    assert json.load(open(os.path.join(out, "metrics.json")))["modes"] >= 0
    # only rank 0 logs: one line per log step
    assert [json.loads(x)["step"] for x in open(os.path.join(out, "log.jsonl"))] == [10, 20]


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path):
    cases = [
        (["--dataset", "nope"], "invalid choice: 'nope'"),
        (["--dataset", "ring", "--lambda-cons", "nan"], "--lambda-cons must be a finite number"),
        (["--dataset", "ring", "--batch-size", "0"], "--batch-size must be a finite number > 0"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path / "none")], "missing cifar10 file"),
        (["--dataset", "ring", "--out", str(tmp_path / "x"), "--resume"], "no checkpoint"),
    ]
    for args, message in cases:
        proc = run_script(["invert_gan.py", *args])
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr)
    # a checkpoint of another method is refused
    other = tmp_path / "other"
    other.mkdir()
    common.save_checkpoint(other / "ckpt.pt", {"method": "maem_gan", "args": {}})
    proc = run_script(["invert_gan.py", "--dataset", "ring", "--out", str(other), "--resume"])
    assert proc.returncode == 2 and "not of 'invert_gan'" in proc.stderr


def test_evaluate_ckpt_reads_an_invert_gan_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    invert_gan.main(["--dataset", "grid", "--out", out, *TINY])
    proc = run_script(["evaluate.py", "ckpt", os.path.join(out, "ckpt.pt"), "--n", "3000",
                       "--json", str(tmp_path / "m.json")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.load(open(tmp_path / "m.json"))
    assert 0 <= metrics["modes"] <= 25 and 0 <= metrics["hq_fraction"] <= 1 and "reverse_kl" in metrics
