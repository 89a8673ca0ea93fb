"""Tests of pgm_gan.py: the guide (Eq. 6-7), Theorem 3's architecture, Eq. 4 and 5 by hand, the
kNN graph, the rejection sampler, then every stage and baseline of the real script on tiny settings."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import common
import pgm_gan
from bench_pgm import descend_on_guide
from conftest import run_script, run_torchrun, run_until_crash
from test_common import write_mnist

# 2-D runs: a few steps of every stage (the ring, partitioner fit on 400 points).
TINY_2D = ["--dataset", "ring", "--steps", "6", "--part-steps", "4", "--part-samples", "400",
           "--neighbors", "5", "--k", "8", "--width", "16", "--part-width", "8", "--part-blocks", "2",
           "--log-every", "3", "--ckpt-every", "3", "--sample-every", "6", "--eval-samples", "500",
           "--reject-tries", "2", "--device", "cpu"]


def tiny_args(**over):
    args = pgm_gan.parse_args(["--dataset", "ring", "--out", "/tmp/unused"])
    for k, v in over.items():
        setattr(args, k, v)
    return args


# ---------------------------------------------------------------- the guide R_i (Eq. 6, 7)
def test_guide_hand_values_sum_and_mean():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 4.0, -1.0]])
    y = torch.tensor([1, 1])
    # row 0: (3-1)+ + (1-1)+ + (2-1)+ = 3; row 1: x is in A_1 -> 0
    assert pgm_gan.guide(logits, y, "sum").tolist() == [3.0, 0.0]
    assert pgm_gan.guide(logits, y, "mean").tolist() == [1.0, 0.0]       # official: / k


def test_guide_is_zero_exactly_on_its_partition_and_positive_elsewhere():
    torch.manual_seed(0)
    S = pgm_gan.Partitioner((2,), 5, n_blocks=2, width=8, lipschitz=0.9).eval()
    x = torch.randn(2000, 2) * 3
    logits = S(x)
    used = logits.argmax(1).unique()
    assert len(used) >= 3
    for i in used.tolist():
        r = pgm_gan.guide(logits, torch.full((2000,), i))
        inside = logits.argmax(1) == i
        assert torch.all(r[inside] == 0)
        assert torch.all(r[~inside] > 0)


def test_guide_gradient_leads_into_the_partition_from_anywhere():
    """Thm. 3: no local minimum of R_i outside A_i, so plain gradient descent on R_i from any start
    ends inside A_i (on a random Lipschitz-bounded toy partitioner)."""
    torch.manual_seed(1)
    S = pgm_gan.Partitioner((2,), 4, n_blocks=3, width=16, lipschitz=0.9)
    with torch.no_grad():                    # W: four cones in phi-space, so no A_i is empty
        S.head.weight.copy_(torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]]))
        S.head.bias.zero_()
        for m in S.modules():                # a strongly non-linear phi: psi at its bound
            if isinstance(m, pgm_gan.LipschitzLayer):
                m.layer.weight.mul_(20)
    S.converge(50)
    S.eval().requires_grad_(False)
    start = torch.randn(40, 2) * 4
    for i in range(4):
        x = start.clone().requires_grad_(True)
        y = torch.full((40,), i)
        r0 = pgm_gan.guide(S(x), y)
        g, = torch.autograd.grad(r0.sum(), x)
        outside = r0 > 0
        assert outside.sum() > 8
        assert torch.all(g[outside].norm(dim=1) > 0)           # a direction everywhere outside A_i
        # a small step along -grad lowers R_i (the gradient points towards the partition)
        r1 = pgm_gan.guide(S(x.detach() - 1e-3 * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)), y)
        assert torch.all(r1[outside] < r0.detach()[outside])
        assert torch.all(descend_on_guide(S, start, i) == 0), i


def test_guide_descent_gets_stuck_with_the_unconstrained_partitioner():
    """Negative control of the test above (Sec. 5.1, Fig. 3 right): the same descent, from the same
    starts, on a plain ReLU partitioner (--partitioner unconstrained) leaves some starts outside a
    non-empty partition: its R_i has flat regions / local minima outside A_i."""
    torch.manual_seed(1)
    S = common.ReLUClassifier(2, 4, n_layers=3, width=16).eval().requires_grad_(False)
    start = torch.randn(40, 2) * 4
    used = S(torch.randn(20000, 2) * 6).argmax(1).unique().tolist()
    stuck = {i: int((descend_on_guide(S, start, i) > 0).sum()) for i in used}
    assert sum(stuck.values()) >= 3, stuck


def test_guide_weight_anneals_linearly_to_the_floor():
    args = tiny_args(guide_weight=6.0, guide_anneal=1.2e-4, guide_min=1e-4)
    assert pgm_gan.guide_weight(args, 0) == 6.0
    assert pgm_gan.guide_weight(args, 10_000) == pytest.approx(4.8)
    assert pgm_gan.guide_weight(args, 10**6) == 1e-4
    assert pgm_gan.guide_weight(tiny_args(guide_weight=0.0), 0) == 0.0          # Partition GAN
    assert pgm_gan.guide_weight(tiny_args(partition="random"), 0) == 0.0       # no S, no guide
    assert pgm_gan.guide_weight(tiny_args(k=1), 0) == 0.0


# ---------------------------------------------------------------- Theorem 3: the architecture
def top_singular_value(op, adj, shape, iters=300):
    u = torch.randn(1, *shape)
    for _ in range(iters):
        u = adj(op(u))
        u = u / u.norm()
    return op(u).norm().item()


def check_lipschitz_of_trained_partitioner(out, L, flags):
    """Every layer of a trained (conv) partitioner has operator norm <= --lipschitz, by a fresh
    power iteration on the layer's convolution, and so each block is bi-Lipschitz (Thm. 3)."""
    part = common.load_checkpoint(os.path.join(out, "partition.pt"))
    args = pgm_gan.parse_args([*flags, "--lipschitz", str(L)])
    S = pgm_gan.build_partitioner(args, 3)
    S.load_state_dict(part["S"])
    S.eval()
    layers = [m for m in S.modules() if isinstance(m, pgm_gan.LipschitzLayer)]
    assert len(layers) == 3 * 2 and all(isinstance(m.layer, torch.nn.Conv2d) for m in layers)
    for m in layers:
        scale = min(1.0, L / m.sigma.item())
        sv = top_singular_value(lambda u: m._apply_op(u) * scale, lambda v: m._apply_adjoint(v) * scale,
                                m.u.shape[1:])
        assert sv <= L * (1 + 1e-3), sv
    # and so each residual block is bi-Lipschitz: (1 - L^3) |x - y| <= |B(x) - B(y)| <= (1 + L^3) |x - y|
    block = S.blocks[0][0]
    x = torch.randn(64, *layers[0].u.shape[1:])
    y = x + 0.1 * torch.randn_like(x)
    ratio = (block(x) - block(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert torch.all(ratio >= 1 - L ** 3 - 1e-5) and torch.all(ratio <= 1 + L ** 3 + 1e-5)


def test_linear_lipschitz_layer_scales_only_when_above_the_bound():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.mul_(10)                       # far above the bound
    m = pgm_gan.LipschitzLayer(lin, 0.9, (6,))
    m.power_iteration(200)
    m.eval()
    eff = torch.linalg.matrix_norm(lin.weight * min(1.0, 0.9 / m.sigma.item()), ord=2).item()
    assert eff == pytest.approx(0.9, rel=1e-4)
    small = torch.nn.Linear(6, 6)
    with torch.no_grad():
        small.weight.mul_(0.01)
    s = pgm_gan.LipschitzLayer(small, 0.9, (6,))
    s.power_iteration(200)
    s.eval()
    x = torch.randn(3, 6)
    assert torch.allclose(s(x), small(x), atol=1e-6)          # left alone below the bound


@pytest.mark.parametrize("in_shape,levels", [((2,), 0), ((1, 8, 8), 1)])
def test_partitioner_state_dict_keys_match_older_checkpoints(in_shape, levels):
    # partition.pt / ckpt.pt of runs made before LipschitzLayer moved from common.py to pgm_gan.py
    # hold these names: the move must not rename them.
    S = pgm_gan.Partitioner(in_shape, 3, 1, 4, 0.9, levels)
    psi = [f"blocks.0.0.psi.{i}.{name}" for i in range(3) for name in ("u", "sigma", "layer.weight", "layer.bias")]
    assert list(S.state_dict()) == psi + ["head.weight", "head.bias"]


@pytest.mark.parametrize("arch", ["resnet", "dcgan"])
def test_conditional_gan_pair_has_one_head_and_bn_per_partition(arch):
    args = pgm_gan.parse_args(["--dataset", "cifar10", "--out", "/tmp/unused", "--arch", arch,
                               "--width", "4", "--k", "3", "--z-dim", "8"])
    G, D = pgm_gan.build_gan(args, 3)
    y = torch.tensor([0, 2])
    x = G(torch.randn(2, 8), y)
    assert x.shape == (2, 3, 32, 32)
    assert D(x, y).shape == (2, 1) and D(x).shape == (2, 3, 1)     # D_i = head i


def test_2d_presets_one_partition_per_gaussian_and_maxout_d():
    # Sec. 5.1: each Gaussian in its own partition; official 2-D D: maxout.
    for dataset, k in (("grid", 25), ("ring", 8)):
        args = pgm_gan.parse_args(["--dataset", dataset, "--out", "/tmp/unused", "--width", "8"])
        assert args.k == k and args.d_act == "maxout"
        _, D = pgm_gan.build_gan(args, 2)
        assert sum(isinstance(m, common.Maxout) for m in D.modules()) == 3
    args = pgm_gan.parse_args(["--dataset", "ring", "--out", "/tmp/unused", "--width", "8", "--d-act", "relu"])
    _, D = pgm_gan.build_gan(args, 2)
    assert not any(isinstance(m, common.Maxout) for m in D.modules())


def test_squeeze_levels_keep_the_dimension():
    S = pgm_gan.Partitioner((3, 8, 8), 5, n_blocks=3, width=4, lipschitz=0.9, levels=2)
    assert S.feat_dim == 3 * 8 * 8 and len(S.blocks) == 2
    assert S(torch.randn(2, 3, 8, 8)).shape == (2, 5)


# ---------------------------------------------------------------- Eq. 4 and Eq. 5 by hand
def test_nt_xent_hand_value():
    h1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    h2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    tau = 0.5
    z = torch.cat([h1, h2])
    sim = z @ z.T / tau
    pos = {0: 2, 1: 3, 2: 0, 3: 1}
    ref = 0.0
    for i in range(4):
        others = [math.exp(sim[i, k]) for k in range(4) if k != i]
        ref -= math.log(math.exp(sim[i, pos[i]]) / sum(others))
    assert common.nt_xent(h1, h2, tau).item() == pytest.approx(ref / 4, rel=1e-6)


def test_partition_loss_eq5_hand_computation():
    pa = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    pn = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    loss, terms = pgm_gan.partition_loss(pa, pn, alpha=2.0, beta=3.0)
    # <pa_i, pn_i> = 0.5 for both pairs -> consistency = -log 0.5
    assert terms["consistency"].item() == pytest.approx(math.log(2), rel=1e-6)
    # H(pa_0) = log 2, H(pa_1) = 0 -> mean log(2) / 2
    assert terms["entropy"].item() == pytest.approx(math.log(2) / 2, rel=1e-5)
    # mean S = (0.75, 0.25)
    h_mean = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert terms["balance"].item() == pytest.approx(h_mean, rel=1e-6)
    assert loss.item() == pytest.approx(math.log(2) + 2.0 * math.log(2) / 2 - 3.0 * h_mean, rel=1e-5)


def test_partition_objective_over_the_whole_graph_by_hand():
    # 3 points, 2 neighbours each; Eq. 5 over all 6 edges, H of the mean over all 3 points.
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    nbrs = torch.tensor([[1, 2], [0, 2], [0, 1]])
    # <p_i, p_j>: (0,1) 0.5, (0,2) 0, (1,0) 0.5, (1,2) 0.5, (2,0) 0, (2,1) 0.5; log 0 clamps at 1e-8
    cons = (4 * math.log(2) - 2 * math.log(1e-8)) / 6
    ent = math.log(2) / 3                       # only the middle point has entropy (log 2)
    bal = math.log(2)                           # mean = (0.5, 0.5)
    got = pgm_gan.partition_objective(probs, nbrs, alpha=0.5, beta=2.0, chunk=2)   # chunks of 2 points
    assert got == pytest.approx(cons + 0.5 * ent - 2.0 * bal, rel=1e-5)
    # the batch loss with every edge listed once is the same number
    loss, _ = pgm_gan.partition_loss(probs.repeat_interleave(2, 0), probs[nbrs.reshape(-1)], 0.5, 2.0)
    assert loss.item() == pytest.approx(got, rel=1e-5)


def test_part_restarts_keep_the_best_eq5(tmp_path, monkeypatch):
    objs, states = [], []
    real_obj, real_train = pgm_gan.partition_objective, pgm_gan.train_partitioner

    def record_obj(*a, **kw):
        objs.append(real_obj(*a, **kw))
        return objs[-1]

    def record_train(*a, **kw):
        S = real_train(*a, **kw)
        states.append({k: v.clone() for k, v in S.state_dict().items()})
        return S

    monkeypatch.setattr(pgm_gan, "partition_objective", record_obj)
    monkeypatch.setattr(pgm_gan, "train_partitioner", record_train)
    out = str(tmp_path / "restarts")
    pgm_gan.main([*without(TINY_2D, "--part-steps"), "--part-steps", "30", "--part-restarts", "3",
                  "--stage", "partition", "--out", out])
    assert len(objs) == len(states) == 3 and len(set(objs)) == 3           # three different S
    saved = common.load_checkpoint(os.path.join(out, "partition.pt"))["S"]
    best = states[min(range(3), key=objs.__getitem__)]
    assert all(torch.equal(saved[k], best[k]) for k in best)


def test_gan_losses_hinge_and_standard_by_hand():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert pgm_gan.d_loss_fn(real, fake, "hinge").item() == pytest.approx((0 + 1) / 2 + (0 + 1.5) / 2)
    assert pgm_gan.g_loss_fn(fake, "hinge").item() == pytest.approx(0.75)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert pgm_gan.d_loss_fn(real, fake, "standard").item() == pytest.approx(
        (sp(-2) + sp(0)) / 2 + (sp(-2) + sp(0.5)) / 2, rel=1e-6)
    assert pgm_gan.g_loss_fn(fake, "standard").item() == pytest.approx((sp(2) + sp(-0.5)) / 2, rel=1e-6)


def augment(x, a):
    return common.simclr_augment(x, a.aug_crop, a.aug_flip, a.aug_color, a.aug_color_p, a.aug_gray)


def test_augment_flags():
    x = torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8)
    off = tiny_args(aug_crop=1.0, aug_flip=0.0, aug_color=0.0, aug_gray=0.0)
    assert torch.allclose(augment(x, off), x, atol=1e-5)          # identity when all off
    flip = tiny_args(aug_crop=1.0, aug_flip=1.0, aug_color=0.0, aug_gray=0.0)
    assert torch.allclose(augment(x, flip), x.flip(3), atol=1e-5)
    gray = tiny_args(aug_crop=1.0, aug_flip=0.0, aug_color=0.0, aug_gray=1.0)
    g = augment(x, gray)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    color = tiny_args(aug_crop=1.0, aug_flip=0.0, aug_color=0.5, aug_color_p=1.0, aug_gray=0.0)
    assert not torch.allclose(augment(x, color), x, atol=1e-3)
    crop = tiny_args(aug_crop=0.2, aug_flip=0.0, aug_color=0.0, aug_gray=0.0)
    c = augment(x, crop)
    assert c.shape == x.shape and not torch.allclose(c, x, atol=1e-3) and c.abs().max() <= 1 + 1e-6


# ---------------------------------------------------------------- kNN graph, metrics
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_graph_matches_brute_force_in_small_chunks(metric):
    torch.manual_seed(0)
    feats = torch.randn(300, 7)
    got = common.knn_graph(feats, 6, metric, chunk_mb=0.02)      # ~17 rows per chunk
    if metric == "cosine":
        f = F.normalize(feats, dim=1)
        dist = -(f @ f.T)
    else:
        dist = torch.cdist(feats, feats)
    dist.fill_diagonal_(float("inf"))
    ref = dist.argsort(1)[:, :6]
    assert torch.equal(got.sort(1).values, ref.sort(1).values)
    assert not (got == torch.arange(300)[:, None]).any()


def test_partition_metrics_nmi_accuracy_purity():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    m, sizes = common.clustering_metrics(torch.tensor([2, 2, 0, 0, 1, 1]), labels, 4)
    assert m["nmi"] == pytest.approx(1.0) and m["accuracy"] == 1.0 and m["purity"] == 1.0
    assert sizes.tolist() == [2, 2, 2, 0] and m["partitions_used"] == 3
    m, _ = common.clustering_metrics(torch.tensor([0, 1, 0, 1, 0, 1]), labels, 2)
    assert m["nmi"] == pytest.approx(0.0, abs=1e-9) and m["purity"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- rejection sampling
class ToyG(torch.nn.Module):
    """G_y(z) = (z_0, y): the second coordinate tells which generator drew the point."""

    def forward(self, z, y):
        return torch.stack([z[:, 0], y.float()], 1)


class ToyS(torch.nn.Module):
    """Partition 0: x_0 > 0; partition 1: x_0 < 0; partition 2: nowhere."""

    def forward(self, x):
        return torch.stack([x[:, 0], -x[:, 0], torch.full_like(x[:, 0], -1e9)], 1)


def test_rejection_sampler_keeps_each_id_and_returns_only_accepted_samples():
    """Rejection redraws z for the same partition id, so the generators' shares stay pi even for a
    generator that never lands in its partition (whose samples are kept and counted as forced)."""
    torch.manual_seed(0)
    pi = torch.tensor([0.3, 0.5, 0.2])
    draw = pgm_gan.make_sampler(ToyG(), ToyS(), pi, 2, "cpu", reject_tries=20, strict=False)
    x, rate = draw(4000)
    ids = x[:, 1]
    for i in range(3):                                     # shares = pi, partition 2 included
        assert abs((ids == i).float().mean().item() - pi[i].item()) < 0.03, i
    ok = ((ids == 0) & (x[:, 0] > 0)) | ((ids == 1) & (x[:, 0] < 0))
    assert bool(ok[ids != 2].all())                        # only accepted samples from 0 and 1
    assert draw.stats["forced"] == int((ids == 2).sum())   # the empty partition: all forced
    assert rate == 4000 / draw.stats["drawn"]
    # draws: 1 + 20 redraws for each id-2 sample, 1 + up to 20 (p = 1/2 each) for the others
    assert draw.stats["drawn"] == pytest.approx(4000 * (0.2 * 21 + 0.8 * 2), rel=0.05)
    only2 = torch.tensor([0.0, 0.0, 1.0])
    with pytest.raises(RuntimeError, match="still rejected"):
        pgm_gan.make_sampler(ToyG(), ToyS(), only2, 2, "cpu", reject_tries=2)(10)
    raw, rate = pgm_gan.make_sampler(ToyG(), ToyS(), pi, 2, "cpu", rejection=False)(1000)
    assert rate == 1.0 and not bool((((raw[:, 1] == 0) & (raw[:, 0] > 0)) |
                                      ((raw[:, 1] == 1) & (raw[:, 0] < 0)) | (raw[:, 1] == 2)).all())


# ---------------------------------------------------------------- the real script
def without(flags, *names):
    """flags minus each `--name value` pair in names."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in names:
            skip = True
        else:
            out.append(f)
    return out


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_all_stages_on_ring_then_load_sampler(tmp_path):
    out = str(tmp_path / "pgm")
    pgm_gan.main([*TINY_2D, "--out", out, "--alpha", "0.5", "--guide-reduce", "mean", "--pi-samples", "300"])
    for name in ("partition.pt", "ckpt.pt", "metrics.json", "args.json", "log.jsonl",
                 "partition/figure3.png", "samples/step_0000006.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, "pretext.pt"))          # Sec. 5.1: no pretext on 2-D
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("modes", "hq_fraction", "reverse_kl", "acceptance", "partition_nmi", "partition_accuracy"):
        assert key in metrics, key
    log = read_log(os.path.join(out, "log.jsonl"))
    assert [r["step"] for r in log] == [3, 6] and log[0]["lam"] > 0 and "guide" in log[0]
    assert "entropy" in read_log(os.path.join(out, "partition", "log.jsonl"))[-1]
    sample = pgm_gan.load_sampler(os.path.join(out, "ckpt.pt"), "cpu")
    x = sample(300)
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    args = pgm_gan.parse_args([*TINY_2D, "--out", out])
    S = pgm_gan.build_partitioner(args, 2)
    S.load_state_dict(ckpt["S"])
    assert x.shape == (300, 2) and ckpt["pi"].shape == (8,)
    assert common.load_checkpoint(os.path.join(out, "partition.pt"))["sizes"].sum() == 300   # pi from 300 labels


@pytest.mark.parametrize("flags,lam_zero", [(["--partition", "random"], True),
                                            (["--guide-weight", "0"], True),
                                            (["--k", "1"], True),
                                            (["--loss", "hinge", "--n-dis", "2", "--no-rejection",
                                              "--ema", "0.9", "--ema-start", "2", "--amp", "bf16", "--data-std", "0.05"],
                                             False)])
def test_baselines_and_options_run(tmp_path, flags, lam_zero):
    out = str(tmp_path / "b")
    pgm_gan.main([*TINY_2D, "--out", out, *flags])
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    log = read_log(os.path.join(out, "log.jsonl"))
    assert (log[-1]["lam"] == 0) == lam_zero
    if "--partition" in flags:
        assert ckpt["S"] is None and ckpt["pi"].shape == (8,)
    if "--k" in flags:
        assert ckpt["S"] is None and ckpt["pi"].tolist() == [1.0]
    if "--ema" in flags:
        assert ckpt["G_ema"] is not None
    assert "reverse_kl" in json.load(open(os.path.join(out, "metrics.json")))


# ---------------------------------------------------------------- the GAN loop, behaviour
def record_networks(monkeypatch):
    """Every D forward (inputs) and the last partitioner built (the GAN stage's frozen S)."""
    calls, built = [], []
    real_build_gan, real_build_partitioner = pgm_gan.build_gan, pgm_gan.build_partitioner

    def build_gan(*a, **kw):
        G, D = real_build_gan(*a, **kw)
        D.register_forward_pre_hook(lambda m, inp: calls.append((inp[0].detach().clone(), inp[1].clone())))
        return G, D

    def build_partitioner(*a, **kw):
        built.append(real_build_partitioner(*a, **kw))
        return built[-1]
    monkeypatch.setattr(pgm_gan, "build_gan", build_gan)
    monkeypatch.setattr(pgm_gan, "build_partitioner", build_partitioner)
    return calls, built


def test_gan_loop_labels_n_dis_and_a_frozen_partitioner(tmp_path, monkeypatch):
    """--n-dis 2: two D steps (one forward of B real + B fake each) per G step; the real points
    carry y = argmax S(x) and the fakes the same ids; S gets no gradient and stays as trained."""
    calls, built = record_networks(monkeypatch)
    out = str(tmp_path / "loop")
    pgm_gan.main([*without(TINY_2D, "--steps"), "--steps", "3", "--n-dis", "2", "--batch-size", "10",
                  "--eval-samples", "0", "--out", out])
    d_steps = [c for c in calls if len(c[1]) == 20]              # D steps: real and fake together
    g_steps = [c for c in calls if len(c[1]) == 10]              # D inside G's loss
    assert len(d_steps) == 6 and len(g_steps) == 3
    part = common.load_checkpoint(os.path.join(out, "partition.pt"))
    S = built[-1]
    assert not any(p.requires_grad or p.grad is not None for p in S.parameters())
    assert all(torch.equal(v, part["S"][k]) for k, v in S.state_dict().items())   # weights, buffers kept
    fresh = pgm_gan.build_partitioner(pgm_gan.parse_args([*TINY_2D, "--out", out]), 2)
    fresh.load_state_dict(part["S"])
    fresh.eval()
    for x, y in d_steps:
        assert torch.equal(y[:10], y[10:])                      # fakes: the real points' ids
        assert torch.equal(y[:10], fresh(x[:10]).argmax(1))      # real ids = argmax S(x)


def test_guide_reduce_mean_is_the_sum_over_k_in_the_loop(tmp_path):
    """Same partition, same seed: --guide-reduce mean with lambda 8 trains the same G as sum with
    lambda 1 (k = 8), and logs R / k."""
    base = str(tmp_path / "base")
    pgm_gan.main([*TINY_2D, "--out", base, "--stage", "partition"])
    runs = {}
    for name, flags in (("sum", ["--guide-weight", "1", "--guide-anneal", "0"]),
                        ("mean", ["--guide-reduce", "mean", "--guide-weight", "8", "--guide-anneal", "0"])):
        out = tmp_path / name
        out.mkdir()
        shutil.copy(os.path.join(base, "partition.pt"), out / "partition.pt")
        pgm_gan.main([*TINY_2D, "--out", str(out), "--stage", "gan", "--eval-samples", "0", *flags])
        runs[name] = (common.load_checkpoint(str(out / "ckpt.pt"))["G"], read_log(str(out / "log.jsonl")))
    for key, value in runs["sum"][0].items():
        assert torch.allclose(value.float(), runs["mean"][0][key].float(), atol=1e-5), key
    assert runs["sum"][1][0]["guide"] > 0
    assert runs["mean"][1][0]["guide"] == pytest.approx(runs["sum"][1][0]["guide"] / 8, rel=1e-4)


def test_no_rejection_accepts_everything_and_lambda_0_still_logs_the_guide(tmp_path):
    accept = {}
    for name, flags in (("reject", ["--guide-weight", "0"]), ("keep", ["--guide-weight", "0", "--no-rejection"])):
        out = str(tmp_path / name)
        pgm_gan.main([*TINY_2D, "--out", out, *flags])
        accept[name] = json.load(open(os.path.join(out, "metrics.json")))
        log = read_log(os.path.join(out, "log.jsonl"))
        assert all(r["lam"] == 0 and r["guide"] > 0 and 0 < r["outside"] <= 1 for r in log)   # Partition GAN: R seen
    assert accept["keep"]["acceptance"] == 1 and accept["keep"]["forced"] == 0
    assert accept["reject"]["acceptance"] < 1


def test_image_presets_parse_build_and_use_the_official_guide_strength():
    """Every preset builds at tiny width at its own resolution; every image preset's lambda * R
    equals the official 6.0 * mean_c (f_c - f_i)_+ (configs/*/scan_guide*.yaml), not 6.0 * sum."""
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    y = torch.tensor([1])
    for key in pgm_gan.PRESETS:              # a dataset, or (dataset, "pacgan"): --arch pacgan
        dataset, arch = (key, []) if isinstance(key, str) else (key[0], ["--arch", key[1]])
        args = pgm_gan.parse_args(["--dataset", dataset, *arch, "--out", "/tmp/unused", "--width", "4",
                                   "--part-width", "4", "--part-blocks", "2"])
        channels = common.dataset_info(pgm_gan.data_name(args))["channels"]
        G, D = pgm_gan.build_gan(args, channels)
        S = pgm_gan.build_partitioner(args, channels).eval()
        yk = torch.tensor([0, args.k - 1])
        x = G(torch.randn(2, args.z_dim), yk)
        shape = (2, channels) if pgm_gan.is_points(args) else (2, channels, args.img_size, args.img_size)
        assert x.shape == shape and S(x).shape == (2, args.k) and D(x, yk).shape == (2, 1), dataset
        if not pgm_gan.is_points(args):
            strength = pgm_gan.guide_weight(args, 0) * pgm_gan.guide(logits, y, args.guide_reduce)
            assert strength.item() == pytest.approx(6.0 * 3 / 4), dataset
            stacked = dataset.startswith("stacked")       # every stacked count: PacGAN's 25,600
            assert args.ema == 0 and args.eval_samples == (25_600 if stacked else 50_000), dataset


IMG_FLAGS = ["--k", "4", "--width", "8", "--batch-size", "4", "--pretext-batch-size", "8",
             "--pretext-steps", "2", "--part-steps", "2", "--part-batch-size", "4", "--neighbors", "3",
             "--part-blocks", "2", "--part-width", "4", "--part-levels", "2", "--proj-dim", "8",
             "--z-dim", "8", "--log-every", "1", "--ckpt-every", "1", "--sample-every", "2",
             "--eval-samples", "0", "--device", "cpu"]


def test_image_stages_one_by_one(tmp_path, monkeypatch):
    root = str(tmp_path / "mnist")
    write_mnist(root, n_train=24)
    out = str(tmp_path / "img")
    base = ["--dataset", "stacked-mnist", "--data-root", root, "--out", out, *IMG_FLAGS, "--steps", "2"]
    with pytest.raises(common.UsageError, match="run --stage pretext first"):
        pgm_gan.main([*base, "--stage", "partition"])
    pgm_gan.main([*base, "--stage", "pretext", "--aug-crop", "0.5"])
    assert os.path.isfile(os.path.join(out, "pretext.pt"))
    # --part-lr 0.05 grows the weights well past the bound in a few steps
    pgm_gan.main([*base, "--stage", "partition", "--part-steps", "6", "--part-lr", "0.05",
                  "--lipschitz", "0.7"])
    check_lipschitz_of_trained_partitioner(out, 0.7, base)
    part = common.load_checkpoint(os.path.join(out, "partition.pt"))
    pre = common.load_checkpoint(os.path.join(out, "pretext.pt"))
    assert part["sizes"].sum() == 24 and "nmi" in part["metrics"]
    # an (untrained) mode classifier file, as evaluate.py classifier writes it: modes in metrics.json
    cls = str(tmp_path / "cls.pt")
    common.save_mode_classifier(cls, common.ModeClassifier(), dataset="mnist")
    pgm_gan.main([*base, "--stage", "gan", "--classifier", cls, "--eval-samples", "8"])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["counted_fraction"] == 1.0 and "reverse_kl" in metrics and "partition_nmi" in metrics
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 2 and os.path.isfile(os.path.join(out, "samples", "step_0000002.png"))
    with pytest.raises(common.UsageError, match="already holds ckpt.pt"):
        pgm_gan.main([*base, "--stage", "gan"])
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(os.path.join(out, "partition.pt"), other / "partition.pt")
    with pytest.raises(common.UsageError, match="--k 4 --partition learned"):    # stage files must agree
        pgm_gan.main([*base, "--stage", "gan", "--k", "3", "--out", str(other)])
    # S_init = phi_0 (Sec. 4.1), with restarts: each S starts from the same phi_0 with a fresh head
    restarted = tmp_path / "restarts"
    restarted.mkdir()
    shutil.copy(os.path.join(out, "pretext.pt"), restarted / "pretext.pt")
    starts, real_train = [], pgm_gan.train_partitioner

    def record_start(S, *a, **kw):
        starts.append({k: v.clone() for k, v in S.state_dict().items()})
        return real_train(S, *a, **kw)

    monkeypatch.setattr(pgm_gan, "train_partitioner", record_start)
    pgm_gan.main([*without(base, "--out"), "--out", str(restarted), "--stage", "partition",
                  "--part-restarts", "2"])
    monkeypatch.setattr(pgm_gan, "train_partitioner", real_train)
    assert len(starts) == 2
    for start in starts:
        for key, value in pre["phi"].items():
            if not key.startswith("head."):
                assert torch.equal(start[key], value), key                    # phi_0
    heads = [k for k in starts[0] if k.startswith("head.") and k.endswith("weight")]
    assert heads and not any(torch.equal(starts[0][k], starts[1][k]) for k in heads)   # fresh W
    lines = [json.loads(x) for x in open(restarted / "partition" / "log.jsonl")]
    # one log over both restarts (steps 1-2 restart 1, 3-4 restart 2)
    assert [(x["step"], x["restart"]) for x in lines] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    x = pgm_gan.load_sampler(os.path.join(out, "ckpt.pt"))(5)
    assert x.shape == (5, 3, 32, 32)


@pytest.mark.parametrize("mode", ["crash", "extend"])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, mode):
    """crash: the 2-D preset's schedule (lr decay over the second half of --steps), killed right
    after the step-4 checkpoint and resumed with the same --steps. extend: a constant-lr run of 3
    steps continued to 6 (then the lr does not depend on --steps)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    flags = without(TINY_2D, "--steps", "--log-every", "--ckpt-every")
    flags += ["--seed", "3", "--log-every", "1" if mode == "crash" else "3",
              "--ckpt-every", "2" if mode == "crash" else "3"]
    if mode == "extend":
        flags += ["--lr-decay-from", "1"]
    pgm_gan.main([*flags, "--steps", "6", "--out", full])
    if mode == "crash":
        run_until_crash(monkeypatch, pgm_gan.main, [*flags, "--steps", "6", "--out", part],
                        lambda state: state.get("stage") == "gan" and state["step"] == 4)
    else:
        pgm_gan.main([*flags, "--steps", "3", "--out", part])
    pgm_gan.main([*flags, "--steps", "6", "--out", part, "--resume"])
    a = common.load_checkpoint(os.path.join(full, "ckpt.pt"))
    b = common.load_checkpoint(os.path.join(part, "ckpt.pt"))
    assert a["step"] == b["step"] == 6 and b["args"]["seed"] == 3
    for net in ("G", "D"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
    assert a["opt_g"]["state"][0]["exp_avg"].equal(b["opt_g"]["state"][0]["exp_avg"])
    lines = read_log(os.path.join(part, "log.jsonl"))
    if mode == "crash":   # lr of each step: 1e-3 for steps 1-4 (indices 0-3), then linear to 0 at 6
        assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
        assert [r["lr"] for r in lines] == pytest.approx([1e-3] * 4 + [2 / 3 * 1e-3, 1 / 3 * 1e-3])
    else:
        assert [r["step"] for r in lines] == [3, 6]
        assert [r["lr"] for r in lines] == pytest.approx([1e-3, 1e-3])


def test_torchrun_two_processes_on_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    proc = run_torchrun(2, ["pgm_gan.py", *TINY_2D, "--batch-size", "8", "--out", out], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 6
    assert os.path.isfile(os.path.join(out, "metrics.json"))


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path):
    proc = run_script(["pgm_gan.py", "--dataset", "ring", "--lipschitz", "1.0"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --lipschitz must be in (0, 1) (Thm. 3 needs L < 1)"], proc.stderr
    # the same UsageError path in-process (run_cli turns each into one line and exit code 2)
    cases = [(["--dataset", "ring", "--out", str(tmp_path / "x"), "--resume"], "nothing to resume"),
             (["--dataset", "ring", "--arch", "resnet"], "2-D data needs --arch mlp"),
             (["--dataset", "ring", "--out", str(tmp_path / "y"), "--stage", "gan"], "run --stage partition first"),
             (["--dataset", "ring", "--aug-crop", "0"], "--aug-crop"),
             (["--dataset", "cifar10", "--d-act", "relu"], "--d-act sets the mlp D"),
             (["--dataset", "ring", "--lr-decay-from", "1.5"], "--lr-decay-from must be in"),
             (["--dataset", "ring", "--part-restarts", "0"], "--part-restarts must be")]
    for args, message in cases:
        with pytest.raises(common.UsageError, match=message):
            pgm_gan.main(args)


def test_bench_mean_table_over_seeds(tmp_path, capsys):
    import bench_pgm

    for seed, (modes, hq) in enumerate([(8, 0.9), (6, 0.7)]):
        os.makedirs(tmp_path / f"pgmgan-ring-{seed}")
        json.dump({"modes": modes, "hq_fraction": hq, "train_seconds": 100 + 20 * seed},
                  open(tmp_path / f"pgmgan-ring-{seed}" / "metrics.json", "w"))
    bench_pgm.mean_table(str(tmp_path), ["pgmgan", "gan"], ["ring"], [0, 1, 2], ["modes", "hq_fraction", "acceptance"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ring")]
    # mean and sample std of (8, 6) and (0.9, 0.7); a missing key is "-"; no row without runs
    assert rows == ["| ring | pgmgan | 2 | 7 ± 1.4 | 0.8 ± 0.14 | - | 110 ± 14 |"]


def test_torchrun_image_pretext_stage(tmp_path):
    # phi_0 carries the partitioner's head W, unused by the pretext loss: under DDP an unused
    # trainable parameter stops the second step ("Expected to have finished reduction").
    root = str(tmp_path / "mnist")
    write_mnist(root, n_train=24)
    out = str(tmp_path / "ddp-img")
    flags = [f for f in IMG_FLAGS]
    flags[flags.index("--pretext-steps") + 1] = "3"
    proc = run_torchrun(2, ["pgm_gan.py", "--dataset", "stacked-mnist", "--data-root", root,
                            "--out", out, *flags, "--stage", "pretext"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "pretext.pt"))
