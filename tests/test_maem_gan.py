"""Tests of maem_gan.py: the replay buffer, each loss against its equation on hand-made codes,
where the gradients go, then the real script on tiny settings (every flag, resume, torchrun)."""

import argparse
import json
import math
import os

import pytest
import torch

import common
import maem_gan
from conftest import run_script, run_torchrun, run_until_crash

TINY = ["--steps", "6", "--log-every", "3", "--ckpt-every", "6", "--sample-every", "6",
        "--eval-samples", "1000", "--fig3-samples", "300", "--batch-size", "32", "--device", "cpu"]


def log_lines(out):
    return [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]


# ---------------------------------------------------------------- the replay buffer (Eq. 8's R)
def test_buffer_is_fifo_with_a_fixed_length():
    buf = maem_gan.ReplayBuffer(5, 2, "cpu")
    assert len(buf) == 0 and buf.codes().shape == (0, 2)
    seen = []
    for start in (0, 3, 6, 9):                                  # batches of 3 codes: 0..11
        batch = torch.arange(start, start + 3).float().unsqueeze(1).repeat(1, 2)
        buf.push(batch.requires_grad_(True))
        seen += list(range(start, start + 3))
        assert len(buf) == min(len(seen), 5)
        assert buf.codes()[:, 0].tolist() == seen[-5:]         # the last 5, oldest first
    assert not buf.codes().requires_grad                       # stored detached
    buf.push(torch.arange(100, 108).float().unsqueeze(1).repeat(1, 2))   # longer than the buffer
    assert buf.codes()[:, 0].tolist() == [103, 104, 105, 106, 107]
    # state round trip keeps the layout and the pointer
    other = maem_gan.ReplayBuffer(5, 2, "cpu")
    other.load_state_dict(buf.state_dict())
    other.push(torch.full((1, 2), 7.0))
    buf.push(torch.full((1, 2), 7.0))
    assert torch.equal(other.data, buf.data) and other.codes()[:, 0].tolist() == [104, 105, 106, 107, 7]


def test_official_buffer_starts_full_of_uniform_codes():
    buf = maem_gan.ReplayBuffer(64, 3, "cpu", fill_uniform=True, generator=torch.Generator().manual_seed(0))
    assert len(buf) == 64 and buf.codes().abs().max() <= 1 and buf.codes().std() > 0.3


def test_nearest_code_by_cosine_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    v0, bank = torch.randn(17, 6, generator=gen), torch.randn(40, 6, generator=gen)
    v_star, idx = maem_gan.nearest_by_cosine(v0, bank)
    for i in range(len(v0)):
        cos = [float(v0[i] @ b / (v0[i].norm() * b.norm())) for b in bank]
        assert idx[i].item() == max(range(len(bank)), key=lambda j: cos[j])
        assert torch.equal(v_star[i], bank[idx[i]])
    # scale does not matter for the cosine, direction does
    _, idx2 = maem_gan.nearest_by_cosine(v0, bank * torch.rand(40, 1, generator=gen).add(0.1) * 10)
    assert torch.equal(idx, idx2)


# ---------------------------------------------------------------- the losses (Eq. 7, 8, 12-14)
def test_maf_losses_are_eq7_means_over_batch_and_code():
    v_real = torch.tensor([[1.0, 3.0], [0.0, 4.0]])            # realness 2 and 2
    v_fake = torch.tensor([[0.0, 2.0], [1.0, 1.0]])            # realness 1 and 1
    assert maem_gan.maf_loss_d(v_real, v_fake).item() == pytest.approx(1.0 - 2.0)
    assert maem_gan.maf_loss_g(v_fake).item() == pytest.approx(-1.0)


def test_entropy_loss_paper_eq8_by_hand():
    buf = maem_gan.ReplayBuffer(4, 2, "cpu")
    v0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert maem_gan.entropy_loss(v0, buf, 0.5).item() == 0.0            # empty buffer: no term
    buf.push(torch.tensor([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]))
    # V0=(1,0): nearest (1,1), cos 1/sqrt2, |V0| 1.  V0=(0,2): nearest (0,1), cos 1, |V0| 2.
    expected = ((1 / math.sqrt(2) + 0.5 * 1) + (1.0 + 0.5 * 2)) / 2
    assert maem_gan.entropy_loss(v0, buf, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_entropy_loss_official_is_minus_log_mean_nearest_l2():
    buf = maem_gan.ReplayBuffer(4, 2, "cpu")
    buf.push(torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    v0 = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    # squared L2 averaged over m=2: row 1 -> (1, 2), min 1; row 2 -> (2.5, 0.5), min 0.5
    expected = -math.log((1.0 + 0.5) / 2)
    assert maem_gan.entropy_loss(v0, buf, 9.0, "official").item() == pytest.approx(expected, rel=1e-6)


def test_dlle_loss_paper_l2_and_official_mse_with_stop_gradient():
    v = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    v_aug = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
    assert maem_gan.dlle_loss(v, v_aug).item() == pytest.approx((5.0 + 0.0) / 2)       # Eq. 12
    off = maem_gan.dlle_loss(v, v_aug, "official")
    assert off.item() == pytest.approx((9 + 16) / 4)
    off.backward()
    assert v_aug.grad is None and v.grad.abs().sum() > 0       # official: augmented branch detached


def test_isomap_mix_and_loss_by_hand():
    x_real, x_fake = torch.ones(64, 1, 2, 2), torch.zeros(64, 1, 2, 2)
    mix, a = maem_gan.isomap_mix(x_real, x_fake)
    assert a.shape == (64, 1) and (a >= 0).all() and (a <= 1).all()          # paper: U(0, 1)
    assert torch.allclose(mix, a.view(-1, 1, 1, 1).expand_as(mix))
    _, a_off = maem_gan.isomap_mix(x_real, x_fake, "official")
    assert (a_off < 0).any() and (a_off > 1).any()                          # official: N(0, 1)
    a = torch.tensor([[0.5]])
    v_real, v_fake = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])   # mix (1, 1)
    v_mix = torch.tensor([[1.0, 0.0]], requires_grad=True)
    assert maem_gan.isomap_loss(v_mix, v_real, v_fake, a).item() == pytest.approx(1 - 1 / math.sqrt(2))
    v_real.requires_grad_(True)
    torch.manual_seed(0)
    off = maem_gan.isomap_loss(v_mix, v_real, v_fake, a, "official")
    torch.manual_seed(0)
    noise = 0.05 * torch.randn(1, 2)
    assert off.item() == pytest.approx(((torch.tensor([[1.0, 0.0]]) - 1 - noise) ** 2).mean().item(), rel=1e-5)
    off.backward()
    assert v_real.grad is None                                              # target detached


def test_entropy_weight_warmup_and_learning_rate_decay():
    args = argparse.Namespace(no_entropy=False, sigma=0.2, entropy_warmup=100, lr=1.0, lr_decay=0.9,
                              lr_decay_epochs=50, steps=100, lr_decay_from=1.0)
    assert maem_gan.entropy_weight(args, 0) == 0.0
    assert maem_gan.entropy_weight(args, 50) == pytest.approx(0.1)
    assert maem_gan.entropy_weight(args, 300) == pytest.approx(0.2)
    args.entropy_warmup = 0
    assert maem_gan.entropy_weight(args, 0) == 0.2
    args.no_entropy = True
    assert maem_gan.entropy_weight(args, 0) == 0.0
    assert [maem_gan.learning_rate(args, e) for e in (0, 49, 50, 120)] == pytest.approx([1, 1, 0.9, 0.81])
    # --lr-decay-from 0.5 of 100 steps: constant to step 50, then linear to 0, on top of the epochs'
    args.lr_decay_from = 0.5
    assert [maem_gan.learning_rate(args, 50, s) for s in (0, 49, 50, 75, 100)] == \
        pytest.approx([0.9, 0.9, 0.9, 0.45, 0.0])


# ---------------------------------------------------------------- where the gradients go
def tiny_nets(variant, transform="noise"):
    args = maem_gan.parse_args(["--dataset", "ring", "--variant", variant, "--m", "4", "--width", "16",
                                "--dlle-transform", transform, "--lambda-norm", "0.5", "--loss", "maf",
                                "--d-spectral-norm"])
    torch.manual_seed(0)
    G, D = maem_gan.build_networks(args, 2)
    return args, G, D


def deterministic_codes(monkeypatch):
    """embed without the re-parameterisation noise, so a test can recompute the codes."""
    real = maem_gan.embed
    monkeypatch.setattr(maem_gan, "embed", lambda D, x, sample=True, with_mu=False:
                        (real(D, x, False),) * 2 if with_mu else real(D, x, False))
    return real


def brute_cos_nn(v, bank):
    """Eq. 8's cosine to the most similar buffered code, by a Python loop."""
    out = []
    for row in v:
        out.append(max(float(row @ b / (row.norm() * b.norm())) for b in bank))
    return sum(out) / len(out)


@pytest.mark.parametrize("variant", maem_gan.VARIANTS)
def test_d_step_spreads_real_codes_and_never_touches_g(variant, monkeypatch):
    deterministic_codes(monkeypatch)
    args, G, D = tiny_nets(variant, "adv")
    args.iso_weight, args.dlle_weight = 0.5, 2.0
    D.eval()                                # spectral norm without power iterations: codes repeatable
    buffers = maem_gan.make_buffers(args, 8, "cpu")
    z = torch.randn(8, 2)
    with torch.no_grad():
        fake0 = G(z)
    for _ in range(2):                                          # second pass: buffers are non-empty
        x, fake = torch.randn(8, 2, requires_grad=True), fake0.clone().requires_grad_(True)
        G.zero_grad(), D.zero_grad()
        real_before = buffers["real"].codes().clone()
        loss, terms = maem_gan.d_step_loss(D, D, x, fake, args, buffers, 0.3)
        g_x, g_fake = torch.autograd.grad(terms["ent"], [x, fake], retain_graph=True)
        loss.backward()
    assert {"maf", "iso", "dlle", "ent"} <= set(terms)
    # the entropy term is a function of the real codes only, against the buffer of real codes
    assert g_x.abs().sum() > 0 and torch.equal(g_fake, torch.zeros_like(g_fake))
    v_real = maem_gan.embed(D, x.detach()).detach()
    if variant == "paper":                                      # cos to the nearest + lambda |V0|
        expected = brute_cos_nn(v_real, real_before) + 0.5 * v_real.norm(dim=1).mean().item()
    else:                                                       # -log mean min L2^2, no lambda
        d = ((v_real[:, None] - real_before[None]) ** 2).mean(2).min(1).values
        expected = -math.log(d.mean().item())
    assert terms["ent"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(buffers["real"].codes()[-8:], v_real.detach(), atol=1e-6)
    fake_count = 0 if variant == "paper" else 1024
    assert len(buffers["fake"]) == fake_count                  # D never writes the generated buffer
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())
    # the total: the terms with their weights (--iso-weight, --dlle-weight) and sigma
    expected = terms["maf"] + 0.5 * terms["iso"] + 2.0 * terms["dlle"] + 0.3 * terms["ent"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("variant", maem_gan.VARIANTS)
def test_g_step_adds_plus_sigma_entropy_of_generated_codes(variant, monkeypatch):
    deterministic_codes(monkeypatch)
    args, G, D = tiny_nets(variant)
    D.eval()                                # spectral norm without power iterations: codes repeatable
    buffers = maem_gan.make_buffers(args, 8, "cpu")
    z = torch.randn(8, 2)
    buffers["fake"].push(torch.randn(8, 4))
    buffers["real"].push(torch.randn(8, 4) + 5.0)                  # D's buffer must not be read
    fake_before = buffers["fake"].codes().clone()
    fake = G(z)
    g_loss, terms = maem_gan.g_step_loss(D, fake, args, buffers, 0.3)
    v = maem_gan.embed(D, fake.detach())
    assert terms["g_maf"].item() == pytest.approx(-v.mean().item(), rel=1e-6)
    if variant == "paper":                                      # no lambda term in G's loss
        expected = brute_cos_nn(v.detach(), fake_before)
    else:
        d = ((v.detach()[:, None] - fake_before[None]) ** 2).mean(2).min(1).values
        expected = -math.log(d.mean().item())
    assert terms["g_ent"].item() == pytest.approx(expected, rel=1e-5)
    assert g_loss.item() == pytest.approx(terms["g_maf"].item() + 0.3 * expected, rel=1e-5)
    assert torch.allclose(buffers["fake"].codes()[-8:], v.detach(), atol=1e-5)
    # the entropy term reaches G through the codes of its samples
    G.zero_grad()
    (0.3 * terms["g_ent"]).backward()
    assert all(p.grad is not None for p in G.parameters()) and sum(p.grad.abs().sum() for p in G.parameters()) > 0


def test_dlle_and_disomap_gradients_reach_both_branches_on_the_paper_path_only():
    gen = torch.Generator().manual_seed(1)
    v, v_aug = (torch.randn(6, 4, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(2))
    paper = torch.autograd.grad(maem_gan.dlle_loss(v, v_aug), [v, v_aug])
    assert all(g.abs().sum() > 0 for g in paper)                # Eq. 12 stops no gradient
    off = torch.autograd.grad(maem_gan.dlle_loss(v, v_aug, "official"), [v, v_aug], allow_unused=True)
    assert off[0].abs().sum() > 0 and off[1] is None            # official: D(F(x)).detach()
    mix, vr, vf = (torch.randn(6, 4, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    a = torch.rand(6, 1, generator=gen, dtype=torch.float64)
    paper = torch.autograd.grad(maem_gan.isomap_loss(mix, vr, vf, a), [mix, vr, vf])
    assert all(g.abs().sum() > 0 for g in paper)                # target a V_i + (1-a) V_j not detached
    off = torch.autograd.grad(maem_gan.isomap_loss(mix, vr, vf, a, "official"), [mix, vr, vf], allow_unused=True)
    assert off[0].abs().sum() > 0 and off[1] is None and off[2] is None


def test_authors_buffer_searches_its_position_and_shrinks_to_one_slot():
    gen = torch.Generator().manual_seed(0)
    buf = maem_gan.AuthorsReplayBuffer(1024, 64, 3, "cpu", gen)
    assert len(buf) == 1024 and torch.equal(buf.data[:, 0], buf.data[:, 5])      # one draw, repeated
    sizes = []
    for _ in range(18):
        buf.push(torch.randn(64, 3))
        sizes.append(len(buf))
    assert sizes[:3] == [961, 898, 835] and sizes[15] == 16 and sizes[16:] == [1, 1]   # 17th update: 1
    assert maem_gan.AuthorsReplayBuffer.slots_after(1024, 64, 17) == 1
    last = torch.randn(64, 3)
    buf.push(last)
    assert torch.equal(buf.data[0], last)                       # the one slot: the previous batch
    # sample i is compared with position i only: a code equal to position 1's slot, at position 0,
    # is not a zero distance
    small = maem_gan.AuthorsReplayBuffer(4, 2, 2, "cpu", gen)
    small.data = torch.tensor([[[0.0, 0.0], [3.0, 3.0]]])       # one slot, two positions
    v0 = torch.tensor([[3.0, 3.0], [3.0, 3.0]])
    assert small.loss(v0).item() == pytest.approx(-math.log((9.0 + 0.0) / 2))


def test_authors_buffer_runs_end_to_end_only_with_the_official_variant(tmp_path, capsys):
    out = str(tmp_path / "authors")
    maem_gan.main(["--dataset", "ring", "--variant", "official", "--authors-buffer", "--out", out,
                   *TINY, "--buffer-size", "100"])
    bufs = common.load_checkpoint(os.path.join(out, "ckpt.pt"))["buffers"][0]
    # D pushes 3 x 6 real batches (100 -> 69 -> 38 -> 7 -> 1), G pushes 6 generated ones
    assert bufs["real"]["data"].shape == (1, 32, 16)
    assert bufs["fake"]["data"].shape == (maem_gan.AuthorsReplayBuffer.slots_after(100, 32, 6), 32, 16)
    with pytest.raises(SystemExit) as exc:
        common.run_cli(maem_gan.main, ["--dataset", "ring", "--authors-buffer"])
    assert exc.value.code == 2 and "--variant official" in capsys.readouterr().err


def test_cosine_search_stays_float32_under_bf16_autocast():
    v0 = torch.tensor([[1.0, 0.0, 0.0]])
    bank = torch.tensor([[1.0, 0.030, 0.0], [1.0, 0.0, 0.020], [1.0, 0.0, 0.025]])  # cos .99955/.9998/.99969
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, idx = maem_gan.nearest_by_cosine(v0, bank)
        buf = maem_gan.ReplayBuffer(4, 3, "cpu")
        buf.push(bank)
        loss = maem_gan.entropy_loss(v0, buf)
    assert idx.tolist() == [1] and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1 / math.sqrt(1 + 0.02 ** 2), abs=1e-7)


def test_health_figures_read_one_for_codes_that_share_a_direction():
    same = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    noisy = same + torch.randn(3, 2)
    buf = maem_gan.ReplayBuffer(8, 2, "cpu")
    assert maem_gan.health(noisy, same, buf)["cos_batch"].item() == pytest.approx(1.0)   # mu's directions
    orth = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    buf.push(torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))
    h = maem_gan.health(orth, orth, buf)
    assert h["cos_batch"].item() == pytest.approx(0.0, abs=1e-7)
    assert h["cos_nn"].item() == pytest.approx(1 / math.sqrt(2))


def test_ablation_flags_remove_their_terms_and_inputs():
    args, G, D = tiny_nets("paper")
    args.no_disomap, args.dlle_transform, args.no_entropy = True, "none", True
    calls = []
    D.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    loss, terms = maem_gan.d_step_loss(D, D, torch.randn(8, 2), torch.randn(8, 2), args,
                                       maem_gan.make_buffers(args, 8, "cpu"), 1.0)
    assert set(terms) == {"maf", "real_cos_batch"} and calls == [16]             # L_MaF only: real + fake, one forward
    args.no_disomap = False
    args.dlle_transform = "rot-noise"
    calls.clear()
    maem_gan.d_step_loss(D, D, torch.randn(8, 2), torch.randn(8, 2), args, maem_gan.make_buffers(args, 8, "cpu"), 1.0)
    assert calls == [40]                                         # + mixes + F(real) + F(fake)


def test_dlle_noise_anneal_by_hand_and_in_training(tmp_path, monkeypatch):
    args = argparse.Namespace(dlle_noise=0.04, dlle_noise_anneal=None, steps=100)
    assert [maem_gan.dlle_noise_std(args, s) for s in (0, 60, 99)] == [0.04] * 3       # the paper's
    args.dlle_noise_anneal = (0.25, 0.75)                  # 0.04 to step 25, linear to 0 at step 75
    assert [maem_gan.dlle_noise_std(args, s) for s in (0, 25, 50, 70, 75, 99)] == \
        pytest.approx([0.04, 0.04, 0.02, 0.004, 0.0, 0.0])
    # training draws F's noise with that std at each G step, the same for its n_critic D steps
    seen, moved, real = [], [], maem_gan.dlle_transform

    def spy(x, a, D=None, std=None):
        out = real(x, a, D, std=std)
        seen.append(round(std, 6))
        moved.append((out - x).std().item())                       # the noise F actually added
        return out

    monkeypatch.setattr(maem_gan, "dlle_transform", spy)
    maem_gan.main(["--dataset", "ring", "--out", str(tmp_path / "run"), *TINY, "--n-critic", "2",
                   "--dlle-noise", "0.03", "--dlle-noise-anneal", "0", "0.5"])
    per_d_step = [0.03, 0.02, 0.01, 0.0, 0.0, 0.0]                 # G steps 0-5: 0 at step 3 of 6
    assert seen == [s for s in per_d_step for _ in range(2 * 2)]   # real and fake, 2 D steps
    assert moved[:4] == pytest.approx([0.03] * 4, rel=0.3) and moved[-4:] == [0.0] * 4


@pytest.mark.parametrize("flags, expect_sn, loss", [
    ([], False, "ns"), (["--no-d-spectral-norm"], False, "ns"), (["--d-spectral-norm"], True, "ns"),
    (["--variant", "official"], True, "maf"),                                 # the authors' D and loss
    (["--variant", "official", "--no-d-spectral-norm", "--loss", "ns"], False, "ns")])
def test_two_d_discriminator_spectral_norm_follows_the_flag(flags, expect_sn, loss):
    from torch.nn.utils import parametrize

    args = maem_gan.parse_args(["--dataset", "grid", "--width", "8", *flags])
    assert args.loss == loss
    _, D = maem_gan.build_networks(args, 2)
    linears = [m for m in D.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(parametrize.is_parametrized(m, "weight") == expect_sn for m in linears)


def test_image_transforms_keep_shape_and_move_the_image():
    args = argparse.Namespace(dlle_transform="rot-noise", dlle_noise=0.0, rot_degrees=30.0)
    x = torch.zeros(4, 3, 16, 16)
    x[:, :, 2:6, 7:9] = 1.0                                      # a bar off the centre
    rot = maem_gan.dlle_transform(x, args)
    assert rot.shape == x.shape and not torch.allclose(rot, x)
    args.dlle_transform = "flip-noise"
    flip = maem_gan.dlle_transform(x, args)
    assert torch.equal(flip, x.flip(2)) or torch.equal(flip, x.flip(3))
    eps = torch.randn_like(x)
    args.dlle_noise = 0.001
    assert torch.equal(maem_gan.dlle_transform(x, args, flip_dim=3, eps=eps), x.flip(3) + 0.001 * eps)
    args.dlle_transform, args.dlle_noise = "noise", 0.1
    assert (maem_gan.dlle_transform(x, args) - x).std().item() == pytest.approx(0.1, rel=0.1)


def test_rotation_by_a_known_angle():
    x = torch.rand(2, 3, 9, 9)
    quarter = maem_gan.rotate(x, torch.full((2,), math.pi / 2))
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)     # counter-clockwise
    half = maem_gan.rotate(x, torch.tensor([math.pi, 0.0]))
    assert torch.allclose(half[0], x[0].flip(1).flip(2), atol=1e-5) and torch.allclose(half[1], x[1], atol=1e-6)


def test_adversarial_transform_steps_along_the_sign_of_the_gap_gradient():
    class Linear(torch.nn.Module):                              # mu = W x, logvar = 0
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([[2.0, -1.0], [0.5, 3.0]]))

        def forward(self, x):
            return torch.cat([x @ self.w.T, torch.zeros_like(x)], 1)

    D = Linear()
    args = argparse.Namespace(dlle_transform="adv", dlle_noise=0.1)
    x = torch.randn(16, 2)
    torch.manual_seed(5)
    out = maem_gan.dlle_transform(x, args, D)
    torch.manual_seed(5)
    delta = 0.1 * torch.randn_like(x)
    grad = 2 * (delta @ D.w.T) @ D.w.detach()                 # d/d delta ||W delta||^2
    assert torch.allclose(out, x + 0.1 * grad.sign())
    assert D.training and D.w.grad is None                      # D untouched


@pytest.mark.parametrize("name", sorted(maem_gan.PRESETS))
def test_every_preset_parses_and_builds_its_networks(name):
    args = maem_gan.parse_args(["--dataset", name, "--width", "2"])
    assert set(maem_gan.PRESET_SOURCES) == set(maem_gan.PRESETS)
    info = common.DATASETS[args.data_name]
    G, D = maem_gan.build_networks(args, info["channels"])
    z = torch.randn(2, args.z_dim)
    with torch.no_grad():
        x = G(z)
        v = D(x)
    expected = (2, 2) if info["kind"] == "points" else (2, info["channels"], args.img_size, args.img_size)
    assert tuple(x.shape) == expected and tuple(v.shape) == (2, 2 * args.m)
    assert args.dlle_transform in maem_gan.DLLE_TRANSFORMS and args.steps > 0 and args.lr > 0


def test_official_variant_flips_real_images(tmp_path, monkeypatch):
    from test_common import write_mnist

    write_mnist(str(tmp_path / "data"), n_train=8, n_test=4)
    seen = []
    real_embed = maem_gan.embed

    def spy(D, x, sample=True, with_mu=False):
        seen.append(x[:4].detach().clone())                     # the real batch comes first
        return real_embed(D, x, sample, with_mu)

    monkeypatch.setattr(maem_gan, "embed", spy)
    base = ["--dataset", "stacked-mnist", "--data-root", str(tmp_path / "data"), "--width", "2",
            "--batch-size", "4", "--steps", "1", "--n-critic", "2", "--m", "2", "--no-dlle",
            "--no-disomap", "--fig3-samples", "4", "--seed", "0"]
    monkeypatch.setattr(maem_gan, "final_metrics", lambda *a: {})
    firsts = {}
    for flag in ("--no-hflip", "--hflip"):
        seen.clear()
        maem_gan.main([*base, flag, "--out", str(tmp_path / flag)])
        firsts[flag] = seen[0]
    plain, flipped = firsts["--no-hflip"], firsts["--hflip"]
    same = [torch.equal(a, b) for a, b in zip(plain, flipped)]
    mirrored = [torch.equal(a.flip(2), b) for a, b in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored)
    assert maem_gan.parse_args(["--dataset", "ring", "--variant", "official"]).hflip


# ---------------------------------------------------------------- the script, end to end
@pytest.mark.parametrize("flags", [
    [],                                                                       # paper, all terms
    ["--variant", "official", "--entropy-warmup", "0", "--buffer-size", "16"],
    ["--dlle-transform", "adv", "--lambda-norm", "2", "--no-disomap"],
    ["--no-dlle", "--no-entropy", "--no-disomap"],                             # Table 1 baseline
])
def test_flags_train_on_ring(tmp_path, flags):
    out = str(tmp_path / "run")
    maem_gan.main(["--dataset", "ring", "--out", out, *TINY, *flags])
    lines = log_lines(out)
    assert [x["step"] for x in lines] == [3, 6]
    assert all(math.isfinite(v) for x in lines for v in x.values() if isinstance(v, float))
    last = lines[-1]
    assert ("iso" in last) != ("--no-disomap" in flags)
    assert ("dlle" in last) != ("--no-dlle" in flags)
    assert ("ent" in last and "g_ent" in last) != ("--no-entropy" in flags)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert {"modes", "hq_fraction", "reverse_kl"} <= set(metrics)
    assert os.path.isfile(os.path.join(out, "figure3.png"))
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="maem_gan")
    bufs = ckpt["buffers"][0]
    assert set(bufs) == {"real", "fake"}
    if "--variant" in flags:
        assert bufs["real"]["data"].shape == (16, 16)
    else:           # D pushes real, G generated codes (also without the term: the health figures)
        assert ckpt["args"]["n_critic"] == 1                      # the 2-D presets: one D step per G step
        assert bufs["real"]["count"] == 6 * 32 and bufs["fake"]["count"] == 6 * 32
    assert ("real_cos_nn" in last) and ("fake_cos_nn" in last)
    sample = maem_gan.load_sampler(os.path.join(out, "ckpt.pt"))
    assert sample(7).shape == (7, 2) and sample.dataset == "ring"


def test_official_warmup_zeroes_the_entropy_in_the_first_epoch(tmp_path):
    out = str(tmp_path / "off")
    maem_gan.main(["--dataset", "grid", "--variant", "official", "--out", out, *TINY])
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["dlle_transform"] == "flip-noise" and args["dlle_noise"] == 0.001 and args["entropy_warmup"] == 100
    assert all(x["ent_w"] == 0.0 for x in log_lines(out))


def test_tiny_images_rot_noise_bf16_and_lr_decay(tmp_path):
    from test_common import write_mnist

    write_mnist(str(tmp_path / "data"), n_train=8, n_test=4)
    out = str(tmp_path / "img")
    proc = run_script(["maem_gan.py", "--dataset", "stacked-mnist", "--data-root", str(tmp_path / "data"),
                       "--width", "4", "--batch-size", "4", "--steps", "4", "--n-critic", "1",
                       "--log-every", "1", "--ckpt-every", "4", "--sample-every", "4",
                       "--fig3-samples", "12", "--rot-degrees", "20", "--lr-decay", "0.5",
                       "--lr-decay-epochs", "1", "--amp", "bf16", "--m", "4", "--sigma", "0.1",
                       "--out", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = log_lines(out)
    # 8 images / batch 4 = 2 batches per epoch: the lr halves every 2 steps (n_critic 1)
    assert [x["lr"] for x in lines] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5])
    assert "mode metrics skipped" in proc.stdout
    assert os.path.isfile(os.path.join(out, "figure3.png"))
    from PIL import Image
    w, h = Image.open(os.path.join(out, "figure3.png")).size
    assert (w, h) == (5 * 34 + 2, 4 * 34 + 2)                     # 4 code dims x top-5, 32 px + padding
    sample = maem_gan.load_sampler(os.path.join(out, "ckpt.pt"))
    x = sample(3)
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("variant", [["--variant", "paper"], ["--variant", "official"],
                                     ["--variant", "official", "--authors-buffer"]])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, variant):
    """Killed after the step-4 checkpoint of 8 and resumed: the ring preset's schedules (the lr
    decay from step 4, DLLE's noise annealed over steps 2-6) are functions of the step."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    flags = ["--dataset", "ring", "--log-every", "2", "--ckpt-every", "4", "--sample-every", "4",
             "--eval-samples", "500", "--fig3-samples", "100", "--batch-size", "16", "--device", "cpu",
             "--seed", "3", *variant, "--buffer-size", "40", "--entropy-warmup", "0", "--steps", "8"]
    if "official" in variant:
        flags += ["--dlle-transform", "noise", "--dlle-noise", "0.02"]     # the anneal acts on noise
    maem_gan.main([*flags, "--out", full])
    run_until_crash(monkeypatch, maem_gan.main, [*flags, "--out", part], lambda state: state["step"] == 4)
    maem_gan.main([*flags, "--out", part, "--resume"])
    a = common.load_checkpoint(os.path.join(full, "ckpt.pt"))
    b = common.load_checkpoint(os.path.join(part, "ckpt.pt"))
    for net in ("G", "D"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
    for name, buf in a["buffers"][0].items():                      # the replay buffers too
        assert torch.equal(buf["data"], b["buffers"][0][name]["data"]) and buf.get("ptr") == b["buffers"][0][name].get("ptr")
    assert a["opt_d"]["state"][0]["exp_avg"].equal(b["opt_d"]["state"][0]["exp_avg"])
    assert log_lines(full) == [dict(x, it_s=y["it_s"]) for x, y in zip(log_lines(part), log_lines(full))]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = maem_gan.isomap_loss, {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        return real(*args) * (float("nan") if calls["n"] > 3 * 4 else 1.0)   # NaN from G step 5 on

    monkeypatch.setattr(maem_gan, "isomap_loss", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(common.UsageError, match="non-finite loss at step 6"):
        maem_gan.main(["--dataset", "ring", "--steps", "8", "--log-every", "2", "--ckpt-every", "4",
                       "--sample-every", "8", "--batch-size", "16", "--out", out, "--device", "cpu",
                       "--n-critic", "3"])
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 4
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_torchrun_two_processes_on_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    proc = run_torchrun(2, ["maem_gan.py", "--dataset", "ring", "--out", out, "--buffer-size", "32", *TINY],
                        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="maem_gan")
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 2 and len(ckpt["buffers"]) == 2
    # one buffer per rank, each filled with that rank's own codes
    assert not torch.equal(ckpt["buffers"][0]["fake"]["data"], ckpt["buffers"][1]["fake"]["data"])
    assert [x["step"] for x in log_lines(out)] == [3, 6]          # only rank 0 logs


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, capsys):
    cases = [
        (["--dataset", "nope"], "invalid choice: 'nope'"),
        (["--dataset", "ring", "--sigma", "-1"], "--sigma must be a finite number >= 0"),
        (["--dataset", "ring", "--buffer-size", "0"], "--buffer-size must be a finite number > 0"),
        (["--dataset", "ring", "--out", str(tmp_path / "x"), "--resume"], "no checkpoint"),
        (["--dataset", "grid", "--dlle-noise-anneal", "0.6", "0.25"], "needs 0 <= FROM < TO <= 1"),
        (["--dataset", "cifar10", "--no-d-spectral-norm"], "--no-d-spectral-norm is for --arch mlp"),
        (["--dataset", "cifar10", "--d-act", "leaky_relu"], "--d-act is for --arch mlp"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            common.run_cli(maem_gan.main, args)
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)
    other = tmp_path / "other"
    other.mkdir()
    common.save_checkpoint(other / "ckpt.pt", {"method": "invert_gan", "args": {}})
    with pytest.raises(SystemExit):
        common.run_cli(maem_gan.main, ["--dataset", "ring", "--out", str(other), "--resume"])
    assert "not of 'maem_gan'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, act", [([], torch.nn.LeakyReLU), (["--d-act", "relu"], torch.nn.ReLU)])
def test_two_d_discriminator_activation_follows_the_flag(flags, act):
    args = maem_gan.parse_args(["--dataset", "ring", "--width", "8", *flags])
    _, D = maem_gan.build_networks(args, 2)
    acts = [m for m in D.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU))]
    assert len(acts) == 3 and all(type(m) is act for m in acts)
    if act is torch.nn.LeakyReLU:
        assert acts[0].negative_slope == 0.2


def test_resume_refuses_a_2d_checkpoint_from_before_the_spectral_norm_flag(tmp_path, capsys):
    out = str(tmp_path / "old")
    maem_gan.main(["--dataset", "ring", "--out", out, *TINY, "--d-spectral-norm"])
    path = os.path.join(out, "ckpt.pt")
    ckpt = common.load_checkpoint(path)
    del ckpt["args"]["d_spectral_norm"]                   # what an older maem_gan.py wrote
    common.save_checkpoint(path, ckpt)
    with pytest.raises(SystemExit) as exc:
        common.run_cli(maem_gan.main, ["--dataset", "ring", "--out", out, "--resume", "--steps", "9"])
    assert exc.value.code == 2 and "older maem_gan.py" in capsys.readouterr().err


def test_code_directions_count_the_directions_mode_codes_vary_in():
    args = maem_gan.parse_args(["--dataset", "grid", "--m", "4"])

    class D(torch.nn.Module):                                   # mu = f(x), logvar = 0
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x):
            return torch.cat([self.f(x), torch.zeros(len(x), 4)], 1)

    line = maem_gan.code_directions(D(lambda x: x[:, :1] * torch.tensor([[1.0, 2, 0, 0]]) + 5), args, "cpu")
    assert line["code_dims"] == pytest.approx(1.0, abs=0.01) and line["code_cos_modes_max"] == pytest.approx(1.0)
    spread = maem_gan.code_directions(D(lambda x: torch.cat([x, x ** 2], 1)), args, "cpu")
    # (x, y, x^2, y^2) over the 5 x 5 grid: four uncorrelated coordinates, variances 8, 8, 44.8, 44.8
    assert spread["code_dims"] == pytest.approx((2 * 8 + 2 * 44.8) ** 2 / (2 * 64 + 2 * 44.8 ** 2), rel=0.02)


@pytest.mark.parametrize("variant", maem_gan.VARIANTS)
def test_official_g_step_reuses_the_last_d_steps_z(variant, tmp_path, monkeypatch):
    seen = []
    build = maem_gan.build_networks

    def spy(args, channels):
        G, D = build(args, channels)
        G.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
        return G, D

    monkeypatch.setattr(maem_gan, "build_networks", spy)
    maem_gan.main(["--dataset", "ring", "--variant", variant, "--out", str(tmp_path / "z"), *TINY,
                   "--n-critic", "3"])
    d_last, g = seen[2], seen[3]                                # n_critic 3 D steps, then the G step
    assert torch.equal(d_last, g) == (variant == "official")
