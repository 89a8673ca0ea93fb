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


def test_kl_sees_sigma_plus_eps_in_every_term_the_quadratic_one_included():
    # A direction of variance 1e-9 (below eps = 1e-6) that mu points along: each term of Eq. 7
    # with eigenvalues lambda + eps, the quadratic one too (1000x larger with Sigma alone).
    c, s = math.cos(0.3), math.sin(0.3)
    v = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)              # eigenvectors (columns)
    lam = torch.tensor([1.0, 1e-9], dtype=torch.float64)
    sigma, mu, eps = v @ torch.diag(lam) @ v.T, torch.tensor([0.3, 0.2], dtype=torch.float64), 1e-6
    le = lam + eps
    ref = 0.5 * (le.log().sum() - 2 + (1 / le).sum() + ((v.T @ mu) ** 2 / le).sum())
    assert invert_gan.gaussian_loss("kl", mu, sigma, eps=eps).item() == pytest.approx(ref.item(), rel=1e-6)


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


@pytest.mark.parametrize("kind", ["w2", "kl", "w2-1d"])
def test_a_direction_collapsed_below_the_floor_gets_a_restoring_gradient(kind):
    # 64 codes spread along the first axis, variance ~1e-8 (below eps = 1e-6) along the second,
    # centred and uncorrelated (mu = 0: KL's quadratic term adds nothing; Sigma diagonal). Every
    # code must be pushed away from the mean along the collapsed axis, as strongly as the loss's
    # slope there says (a clamp at eps passed ~4e-8 instead of ~4e-3 for w2).
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1e-4], dtype=torch.float64)
    z = z - z.mean(0)
    z[:, 1] -= (z[:, 1] @ z[:, 0]) / (z[:, 0] @ z[:, 0]) * z[:, 0]
    z.requires_grad_()
    loss = invert_gan.gaussian_loss(kind, *invert_gan.batch_gaussian(z), eps=1e-6)
    loss.backward()
    outward = -z.grad[:, 1] * z[:, 1].detach()             # > 0: a descent step spreads the code out
    assert (outward > 0).all()
    assert z.grad[:, 1].abs().max() > 1e-3


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_pnorm_gradient_at_exactly_the_standard_normal_is_zero_not_nan(p):
    mu = torch.zeros(3, requires_grad=True)
    sigma = torch.eye(3).requires_grad_()
    invert_gan.gaussian_loss("pnorm", mu, sigma, p=p).backward()
    assert torch.equal(mu.grad, torch.zeros(3)) and torch.equal(sigma.grad, torch.zeros(3, 3))


def test_two_processes_give_the_global_batch_statistics_losses_and_gradients(tmp_path):
    """torchrun, 2 ranks on gloo: each rank holds half of a 12-code batch (tests/invert_ddp_probe.py).
    mu and Sigma are the whole batch's, each loss its one-process value, and each rank's codes get
    2x their one-process gradient (every rank's copy of L_Gau sends its gradient to every rank's
    codes; DDP's average over the 2 ranks halves it again: see invert_gan.batch_gaussian)."""
    proc = run_torchrun(2, [os.path.join(ROOT, "tests", "invert_ddp_probe.py"), str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(tmp_path / "gauss.json"))
    assert r["world_size"] == 2 and r["mu_err"] < 1e-12 and r["sigma_err"] < 1e-12
    for kind in ("pnorm", "w2", "kl", "w2-1d"):
        assert r[kind]["value"] > 0.1 and r[kind]["value_err"] < 1e-10 * r[kind]["value"], kind
        assert r[kind]["grad_scale"] > 1e-3 and r[kind]["grad_ratio_err"] < 1e-10 * r[kind]["grad_scale"], kind


def test_batch_gaussian_is_the_unbiased_mean_and_covariance():
    z = torch.randn(50, 3, dtype=torch.float64)
    mu, sigma = invert_gan.batch_gaussian(z.float())
    assert sigma.dtype == torch.float64          # float64: the eps floor must beat rounding errors
    assert torch.allclose(mu, z.mean(0), atol=1e-7) and torch.allclose(sigma, torch.cov(z.T), atol=1e-7)


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


# ---------------------------------------------------------------- who trains what (Eq. 4, 10, 13)
def small_setup(gauss_loss="pnorm"):
    args = invert_gan.parse_args(["--dataset", "ring", "--gauss-loss", gauss_loss, "--width", "16"])
    rt = common.setup_runtime("cpu", seed=0)
    G, D, F, Dz = invert_gan.build_networks(args, common.DATASETS["ring"]["channels"])
    x = common.build_dataset("ring", n_points=256).points[torch.randperm(256)[:32]]
    return args, rt, G, D, F, Dz, x, torch.randn(32, 2)


def grads(net):
    return [p.grad for p in net.parameters()]


def reached(net):
    return any(g is not None and g.abs().sum() > 0 for g in grads(net))


@pytest.mark.parametrize("gauss_loss", ["pnorm", "w2", "kl", "w2-1d", "zdisc"])
def test_each_term_of_the_g_step_reaches_only_its_networks(gauss_loss):
    # Eq. 10: the GAN term trains G (never F), L_Gau(F) trains F (never G), L_cons both; inside
    # frozen() the critics' weights get no gradient at all (they would be thrown away).
    args, rt, G, D, F, Dz, x, z = small_setup(gauss_loss)
    with invert_gan.frozen(D, Dz):
        terms = invert_gan.gf_losses(G, F, D, Dz, x, z, args, rt)
        for name, term in zip(("gan", "cons", "gauss"), terms):
            for net in (G, F):
                net.zero_grad(set_to_none=True)
            term.backward(retain_graph=True)
            assert (reached(G), reached(F)) == {"gan": (True, False), "cons": (True, True),
                                                "gauss": (False, True)}[name], name
            assert all(g is None for net in (D, Dz) if net is not None for g in grads(net)), name


def test_the_training_loop_freezes_d_in_the_g_step_and_feeds_dz_prior_samples(tmp_path, monkeypatch):
    seen, priors = [], []
    real_gf, real_dz = invert_gan.gf_losses, invert_gan.dz_step

    def spy_gf(G, F, D, Dz, *rest):
        seen.append([p.requires_grad for net in (D, Dz) for p in net.parameters()])
        return real_gf(G, F, D, Dz, *rest)

    def spy_dz(F, Dz, opt_dz, x, z_prior, rt):
        priors.append(len(z_prior))
        return real_dz(F, Dz, opt_dz, x, z_prior, rt)

    monkeypatch.setattr(invert_gan, "gf_losses", spy_gf)
    monkeypatch.setattr(invert_gan, "dz_step", spy_dz)
    invert_gan.main(["--dataset", "ring", "--gauss-loss", "zdisc", "--prior-samples", "300",
                     "--out", str(tmp_path / "f"), *TINY])
    assert len(seen) == 20 and not any(any(step) for step in seen)
    assert priors == [300] * 20


def test_the_g_step_uses_the_last_d_steps_real_batch(tmp_path, monkeypatch):
    # Eq. 10 in train(): with --n-dis 2, D and D_z see two batches per step, and G / F the second.
    d_batches, dz_batches, g_batches = [], [], []
    real_d, real_dz, real_gf = invert_gan.d_step, invert_gan.dz_step, invert_gan.gf_losses
    monkeypatch.setattr(invert_gan, "d_step", lambda G, D, opt, x, *rest: d_batches.append(x.clone())
                        or real_d(G, D, opt, x, *rest))
    monkeypatch.setattr(invert_gan, "dz_step", lambda F, Dz, opt, x, *rest: dz_batches.append(x.clone())
                        or real_dz(F, Dz, opt, x, *rest))
    monkeypatch.setattr(invert_gan, "gf_losses", lambda G, F, D, Dz, x, *rest: g_batches.append(x.clone())
                        or real_gf(G, F, D, Dz, x, *rest))
    invert_gan.main(["--dataset", "ring", "--gauss-loss", "zdisc", "--n-dis", "2", "--steps", "3",
                     "--log-every", "3", "--ckpt-every", "3", "--sample-every", "3", "--eval-samples", "100",
                     "--device", "cpu", "--out", str(tmp_path / "f")])
    assert len(d_batches) == len(dz_batches) == 6 and len(g_batches) == 3
    assert all(torch.equal(a, b) for a, b in zip(d_batches, dz_batches))
    assert all(torch.equal(g, d_batches[2 * i + 1]) for i, g in enumerate(g_batches))
    assert not torch.equal(d_batches[0], d_batches[1])


def test_d_step_trains_d_and_dz_step_trains_dz_and_neither_touches_g_or_f():
    args, rt, G, D, F, Dz, x, z = small_setup("zdisc")
    opt_d, opt_dz = torch.optim.Adam(D.parameters()), torch.optim.Adam(Dz.parameters())
    nets = (("G", G), ("F", F), ("D", D), ("Dz", Dz))
    for step, trained in ((lambda: invert_gan.d_step(G, D, opt_d, x, z, rt), "D"),
                          (lambda: invert_gan.dz_step(F, Dz, opt_dz, x, torch.randn(100, 2), rt), "Dz")):
        before = {name: [p.detach().clone() for p in net.parameters()] for name, net in nets}
        step()
        for name, net in nets:
            same = all(torch.equal(a, b) for a, b in zip(before[name], net.parameters()))
            assert same == (name != trained), (trained, name)
        for name, net in (("G", G), ("F", F)):
            assert all(g is None for g in grads(net)), name        # not even a gradient was computed


# ---------------------------------------------------------------- the script, end to end
@pytest.mark.parametrize("loss", invert_gan.GAUSS_LOSSES)
def test_every_gauss_loss_trains_on_ring_without_nan(tmp_path, loss):
    out = str(tmp_path / loss)
    invert_gan.main(["--dataset", "ring", "--gauss-loss", loss, "--out", out, *TINY])
    lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [x["step"] for x in lines] == [10, 20]
    assert all(math.isfinite(v) for x in lines for k, v in x.items() if isinstance(v, float))
    assert ("dz_loss" in lines[-1]) == (loss == "zdisc")      # D_z is trained (App. A.1)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert {"modes", "hq_fraction", "reverse_kl", "reverse_kl_hq"} <= set(metrics)
    assert os.path.isfile(os.path.join(out, "samples", "step_0000020.png"))
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="invert_gan")
    assert ckpt["step"] == 20 and (ckpt["Dz"] is not None) == (loss == "zdisc")


def test_plain_gan_baseline_flags_switch_the_extra_losses_off(tmp_path):
    # --lambda-cons 0 --gauss-loss none: no term reaches F, which keeps its initial weights,
    # while G trains (the bench's "gan" row is a plain GAN with the same G and D)
    out = str(tmp_path / "gan")
    args = ["--dataset", "grid", "--lambda-cons", "0", "--gauss-loss", "none", "--out", out, *TINY]
    invert_gan.main(args)
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    torch.manual_seed(0)                                      # the run's seed: its initial weights
    G0, _, F0, _ = invert_gan.build_networks(invert_gan.parse_args(args), common.DATASETS["grid"]["channels"])
    assert all(torch.equal(v, ckpt["F"][k]) for k, v in F0.state_dict().items())
    assert not all(torch.equal(v, ckpt["G"][k]) for k, v in G0.state_dict().items())


def one_step_runs(tmp_path, runs, steps=1, dataset="ring"):
    """{name: (out, log lines)} of short runs with a log line at every step, same seed."""
    result = {}
    for name, flags in runs.items():
        out = str(tmp_path / name)
        invert_gan.main(["--dataset", dataset, "--steps", str(steps), "--log-every", "1",
                         "--ckpt-every", str(steps), "--sample-every", str(steps), "--eval-samples", "200",
                         "--device", "cpu", "--out", out, *flags])
        result[name] = out, [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    return result


def test_n_dis_2_updates_d_twice_per_g_step(tmp_path):
    out, _ = one_step_runs(tmp_path, {"n2": ["--n-dis", "2", "--gauss-loss", "zdisc"]}, steps=3)["n2"]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    adam_steps = {name: float(ckpt[name]["state"][0]["step"]) for name in ("opt_d", "opt_dz", "opt_gf")}
    assert adam_steps == {"opt_d": 6, "opt_dz": 6, "opt_gf": 3}
    assert ckpt["stream"]["pos"] == 6                        # two real batches per G step


def test_p_sets_the_norm_of_the_logged_gaussian_loss(tmp_path, monkeypatch):
    stats = []
    real = invert_gan.batch_gaussian
    monkeypatch.setattr(invert_gan, "batch_gaussian", lambda codes: stats.append(real(codes)) or stats[-1])
    _, lines = one_step_runs(tmp_path, {"p3": ["--p", "3"]})["p3"]
    mu, sigma = (t.detach().numpy() for t in stats[0])
    want = (np.abs(mu) ** 3).sum() ** (1 / 3) + (np.abs(sigma - np.eye(2)) ** 3).sum() ** (1 / 3)
    assert lines[0]["gauss"] == pytest.approx(want, rel=1e-6)


def test_amp_bf16_runs_the_forward_passes_in_bf16(tmp_path):
    # same seed, same first batch: the step-1 losses of a bf16 run differ from fp32 by bf16's
    # rounding (~1e-3 relative), not more and not zero
    runs = one_step_runs(tmp_path, {"fp32": [], "bf16": ["--amp", "bf16"]})
    a, b = runs["fp32"][1][0], runs["bf16"][1][0]
    for key in ("cons", "gauss", "d_loss"):
        assert a[key] != b[key] and b[key] == pytest.approx(a[key], rel=0.05), key


def test_z_dim_sets_the_latent_of_g_f_and_the_gaussian_loss(tmp_path, monkeypatch):
    stats = []
    real = invert_gan.batch_gaussian
    monkeypatch.setattr(invert_gan, "batch_gaussian", lambda codes: stats.append(real(codes)) or stats[-1])
    out, _ = one_step_runs(tmp_path, {"z5": ["--z-dim", "5"]})["z5"]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    first_g = [v for k, v in ckpt["G"].items() if k.endswith("weight")][0]
    last_f = [v for k, v in ckpt["F"].items() if k.endswith("weight")][-1]
    assert first_g.shape[1] == 5 and last_f.shape[0] == 5 and stats[0][1].shape == (5, 5)
    assert invert_gan.load_sampler(os.path.join(out, "ckpt.pt"))(7).shape == (7, 2)


def test_lambda_gauss_weights_the_gaussian_term_only(tmp_path):
    # weight 0 trains exactly like no Gaussian loss at all; weight 3 trains differently
    runs = one_step_runs(tmp_path, {"none": ["--gauss-loss", "none"], "w0": ["--lambda-gauss", "0"],
                                    "w3": ["--lambda-gauss", "3"]}, steps=3)
    ck = {name: common.load_checkpoint(os.path.join(out, "ckpt.pt")) for name, (out, _) in runs.items()}
    for net in ("G", "F", "D"):
        assert all(torch.equal(v, ck["w0"][net][k]) for k, v in ck["none"][net].items()), net
    assert not all(torch.equal(v, ck["w3"]["F"][k]) for k, v in ck["none"]["F"].items())


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
    assert sample(5).shape == (5, 3, 32, 32)
    # --width reaches the image D too: the checkpoint's D is SNGAN's ResNet D at base width 8
    want = common.build_discriminator("resnet", 32, 3, width=8).state_dict()
    got = common.load_checkpoint(os.path.join(out, "ckpt.pt"))["D"]
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


def test_torchrun_two_processes_on_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    # kl: at initialisation F's codes barely vary, and KL's tr(Sigma^-1) is where a per-rank
    # estimate of Sigma differs most from the global one (pnorm would differ by ~1e-6 only)
    flags = ["--dataset", "ring", "--gauss-loss", "kl", "--steps", "20", "--log-every", "1",
             "--ckpt-every", "20", "--sample-every", "20", "--eval-samples", "500", "--device", "cpu"]
    proc = run_torchrun(2, ["invert_gan.py", *flags, "--out", out], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="invert_gan")
    assert ckpt["step"] == 20 and len(ckpt["rng"]) == 2         # both ranks' RNG streams saved
    # only rank 0 logs: one line per log step
    lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [x["step"] for x in lines] == list(range(1, 21))
    # Step 1's L_Gau is F's initial weights on the first global batch, which the 2 ranks' halves
    # make up exactly (DistributedSampler): the value of one process on the whole batch
    invert_gan.main([*flags, "--steps", "1", "--ckpt-every", "1", "--sample-every", "1",
                     "--out", str(tmp_path / "one")])
    one = json.loads(open(tmp_path / "one" / "log.jsonl").readline())
    assert lines[0]["gauss"] == pytest.approx(one["gauss"], rel=1e-5)


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path):
    cases = [
        (["--dataset", "nope"], "invalid choice: 'nope'"),
        (["--dataset", "ring", "--lambda-cons", "nan"], "--lambda-cons must be a finite number"),
        (["--dataset", "ring", "--batch-size", "0"], "--batch-size must be a finite number > 0"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path / "none")], "missing cifar10 file"),
        (["--dataset", "ring", "--out", str(tmp_path / "x"), "--resume"], "no checkpoint"),
        (["--dataset", "cifar10", "--arch", "mlp"], "--arch mlp does not fit --dataset cifar10"),
        (["--dataset", "grid", "--arch", "invert-resnet"], "--arch invert-resnet does not fit --dataset grid"),
        (["--dataset", "ring", "--prior-samples", "0"], "--prior-samples must be a finite number > 0"),
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
    invert_gan.main(["--dataset", "grid", "--data-std", "0.2", "--out", out, *TINY])
    proc = run_script(["evaluate.py", "ckpt", os.path.join(out, "ckpt.pt"), "--n", "3000",
                       "--json", str(tmp_path / "m.json")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # evaluate.py ckpt seeds torch with --seed (0) and scores load_sampler's samples
    sample = invert_gan.load_sampler(os.path.join(out, "ckpt.pt"))
    torch.manual_seed(0)
    points = sample(3000)
    assert json.load(open(tmp_path / "m.json")) == common.mode_metrics_2d(points.numpy(), "grid", 0.2)
