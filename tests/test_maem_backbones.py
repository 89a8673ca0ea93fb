"""MaEM-GAN on the paper's large backbones (Tables 6-7): BigGAN's 32x32 networks against the
published layout, the backbones' own losses on hand-made codes, and the script on tiny settings
with and without the MaEM terms (two steps, resume bit-exact)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import common
import maem_gan
from test_common import write_cifar


def log_lines(out):
    return [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]


# ---------------------------------------------------------------- BigGAN 32x32 against its layout
def _weights(net):
    """(name, shape) of every conv / linear weight, the raw weight under spectral norm."""
    out = []
    for name, layer in net.named_modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            out.append((name, tuple(common._raw_weight(layer).shape)))
    return out


def test_biggan32_matches_the_published_layout():
    # BigGAN-PyTorch BigGAN.py, G_arch[32] / D_arch[32] with ch=64, dim_z=128: G linear 128 ->
    # 4*4*256, three up-blocks 256 -> 256 (3x3 convs, 1x1 learned shortcut), BN-ReLU-conv 256 -> 3.
    # D: block 3 -> 256 (first, hidden 256), 256 -> 256 down (1x1 shortcut), two 256 -> 256 blocks
    # without shortcut (identity), linear 256 -> 1. Unconditional BN here: two 128 -> 256 linears.
    G = common.build_generator("biggan", 128, 32, 3)
    D = common.build_discriminator("biggan", 32, 3, out_dim=1)
    g_expected = [("linear", (4096, 128))]
    for b in range(3):
        g_expected += [(f"blocks.{b}.bn1.gain", (256, 128)), (f"blocks.{b}.bn1.bias", (256, 128)),
                       (f"blocks.{b}.conv1", (256, 256, 3, 3)), (f"blocks.{b}.bn2.gain", (256, 128)),
                       (f"blocks.{b}.bn2.bias", (256, 128)), (f"blocks.{b}.conv2", (256, 256, 3, 3)),
                       (f"blocks.{b}.shortcut", (256, 256, 1, 1))]
    g_expected += [("to_img", (3, 256, 3, 3))]
    assert _weights(G) == g_expected
    d_expected = [("blocks.0.conv1", (256, 3, 3, 3)), ("blocks.0.conv2", (256, 256, 3, 3)),
                  ("blocks.0.shortcut", (256, 3, 1, 1)), ("blocks.1.conv1", (256, 256, 3, 3)),
                  ("blocks.1.conv2", (256, 256, 3, 3)), ("blocks.1.shortcut", (256, 256, 1, 1)),
                  ("blocks.2.conv1", (256, 256, 3, 3)), ("blocks.2.conv2", (256, 256, 3, 3)),
                  ("blocks.3.conv1", (256, 256, 3, 3)), ("blocks.3.conv2", (256, 256, 3, 3)),
                  ("head.shared", (1, 256))]
    assert _weights(D) == d_expected
    # Parameter counts by hand from the table: weights + biases (convs, linears; BN-linears have
    # none) + the final BN's affine (2 x 256). BigGAN-PyTorch's class-conditional model for CIFAR-10
    # has 10-row embeddings instead of the z linears: 4,304,387 (G) and 4,207,361 (D, + projection).
    conv_bias = lambda shapes: sum(s[0] for n, s in shapes if "bn" not in n)  # noqa: E731
    numel = lambda shapes: sum(torch.Size(s).numel() for _, s in shapes)    # noqa: E731
    assert common.count_params(G) == numel(g_expected) + conv_bias(g_expected) + 512 == 4_666_883
    assert common.count_params(D) == numel(d_expected) + conv_bias(d_expected) == 4_204_801
    # spectral norm on every conv and linear of both, N02 init
    layers = [m for m in list(G.modules()) + list(D.modules()) if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    assert abs(common._raw_weight(G.blocks[1].conv1).std().item() - 0.02) < 1e-3
    assert G(torch.randn(2, 128)).shape == (2, 3, 32, 32) and D(torch.randn(2, 3, 32, 32)).shape == (2, 1)


def test_biggan_batchnorm_reads_z_through_one_plus_a_linear():
    bn = common.CondBatchNorm2d(3, cond_dim=2).eval()          # running mean 0 / var 1: BN = x / sqrt(1 + eps)
    with torch.no_grad():
        bn.gain.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        bn.bias.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, -1.0]]))
    x, z = torch.randn(2, 3, 4, 4), torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    gain = 1 + z @ bn.gain.weight.T                                           # (2, 3)
    bias = z @ bn.bias.weight.T
    expected = x / (1 + bn.bn.eps) ** 0.5 * gain[:, :, None, None] + bias[:, :, None, None]
    assert torch.allclose(bn(x, z), expected, atol=1e-6)
    # the generator feeds z itself: two z's differing only in G's input change every block's BN
    G = common.build_generator("biggan", 8, 32, 3, width=2).eval()
    calls = []
    G.blocks[0].bn1.register_forward_hook(lambda m, inp, out: calls.append(inp[1]))
    z = torch.randn(3, 8)
    G(z)
    assert torch.equal(calls[0], z)


def test_self_attention_against_a_hand_computation():
    att = common.SelfAttention(16)
    with torch.no_grad():
        att.gamma.fill_(0.7)
    x = torch.randn(2, 16, 4, 4)
    th = torch.einsum("oc,bchw->bohw", att.theta.weight[:, :, 0, 0], x).reshape(2, 2, 16)
    ph = F.max_pool2d(torch.einsum("oc,bchw->bohw", att.phi.weight[:, :, 0, 0], x), 2).reshape(2, 2, 4)
    g = F.max_pool2d(torch.einsum("oc,bchw->bohw", att.g.weight[:, :, 0, 0], x), 2).reshape(2, 8, 4)
    out = torch.empty(2, 8, 16)
    for b in range(2):
        for i in range(16):                                    # each position attends to 4 pooled ones
            w = torch.softmax(th[b, :, i] @ ph[b], dim=0)      # (4,)
            out[b, :, i] = g[b] @ w
    o = torch.einsum("oc,bchw->bohw", att.o.weight[:, :, 0, 0], out.view(2, 8, 4, 4))
    assert torch.allclose(att(x), x + 0.7 * o, atol=1e-5)
    fresh = common.SelfAttention(16)
    assert torch.equal(fresh(x), x)                            # gamma starts at 0: the identity
    G = common.build_generator("biggan", 8, 32, 3, width=2, attention=(16,))
    D = common.build_discriminator("biggan", 32, 3, width=2, attention=(16,))
    assert [type(b).__name__ for b in G.blocks] == ["GBlock", "GBlock", "SelfAttention", "GBlock"]   # 4-8-16|-32
    assert [type(b).__name__ for b in D.blocks] == ["DBlock", "SelfAttention", "DBlock", "DBlock", "DBlock"]


def test_batch_norm_from_batch_leaves_the_running_statistics():
    bn = torch.nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(4.0)
    x = torch.randn(6, 2, 3, 3) * 3 + 1
    with common.batch_norm_from_batch(bn):
        y = bn(x)
    mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    assert torch.allclose(y, (x - mean) / torch.sqrt(var + bn.eps), atol=1e-5)
    assert not bn.training and bn.running_mean.eq(5).all() and bn.running_var.eq(4).all()
    assert bn.num_batches_tracked.item() == 0


# ---------------------------------------------------------------- the backbones' losses on codes
def test_hinge_and_non_saturating_losses_on_the_realness():
    v_real = torch.tensor([[2.0, 0.0], [0.0, 0.0]])          # realness r = mean over m: 1, 0
    v_fake = torch.tensor([[-4.0, 0.0], [1.0, 1.0]])         # -2, 1
    # hinge: mean(relu(1 - r_real)) + mean(relu(1 + r_fake)) = (0 + 1)/2 + (0 + 2)/2
    assert maem_gan.adv_loss_d(v_real, v_fake, "hinge").item() == pytest.approx(0.5 + 1.0)
    assert maem_gan.adv_loss_g(v_fake, "hinge").item() == pytest.approx(0.5)      # -mean(r_fake)
    sp = lambda t: torch.log1p(torch.exp(torch.tensor(t))).item()  # noqa: E731
    assert maem_gan.adv_loss_d(v_real, v_fake, "ns").item() == pytest.approx(
        (sp(-2.0) + sp(1.0)) / 2 + (sp(-1.0) + sp(0.0)) / 2, rel=1e-6)
    assert maem_gan.adv_loss_g(v_fake, "ns").item() == pytest.approx((sp(2.0) + sp(-1.0)) / 2, rel=1e-6)
    assert maem_gan.adv_loss_d(v_real, v_fake, "maf").item() == pytest.approx(-0.5 - 0.5)


def test_r1_reads_the_mean_code_without_the_noise():
    class Linear(torch.nn.Module):                            # mu = x a_k, logvar = 3 x a_k: noisy V
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor([[1.0, 3.0], [2.0, -1.0]]))   # (d, m)

        def forward(self, x):                                 # logvar depends on x: the sampled
            return torch.cat([x @ self.a, 3 * x @ self.a], 1)   # code's gradient differs from mu's

    x = torch.randn(5, 2)
    # r = mean_k mu_k = x . mean(a, 1) = x . (2, 0.5): ||grad||^2 = 4.25 for every sample
    r1 = maem_gan.r1_loss(Linear(), x)
    assert r1.item() == pytest.approx(4.25, rel=1e-6)


# ---------------------------------------------------------------- the script, tiny BigGAN
BIGGAN_TINY = ["--dataset", "cifar10", "--arch", "biggan", "--width", "2", "--batch-size", "4",
               "--n-critic", "2", "--z-dim", "8", "--m", "4", "--log-every", "1", "--ckpt-every", "2",
               "--sample-every", "2", "--fig3-samples", "8", "--eval-samples", "8", "--ema-start", "1",
               "--device", "cpu"]


@pytest.mark.parametrize("terms", [[], ["--no-entropy", "--no-dlle", "--no-disomap", "--scalar-head"]])
def test_biggan_two_steps_with_and_without_the_maem_terms(tmp_path, monkeypatch, terms):
    write_cifar(str(tmp_path / "data"), "cifar10", n=12)
    monkeypatch.setattr(maem_gan, "final_metrics", lambda *a: {})
    out = str(tmp_path / "run")
    maem_gan.main([*BIGGAN_TINY, "--data-root", str(tmp_path / "data"), "--steps", "2", "--out", out, *terms])
    args = json.load(open(os.path.join(out, "args.json")))
    assert (args["loss"], args["n_critic"], args["ema"], args["split"]) == ("hinge", 2, 0.9999, "train")
    last = log_lines(out)[-1]
    assert "adv" in last and "g_adv" in last and "maf" not in last
    assert ("ent" in last and "iso" in last and "dlle" in last) != bool(terms)
    # the baseline's D is BigGAN's: one output, its realness used as is (no code, no noise)
    D = maem_gan.build_networks(argparse_ns(args), 3)[1]
    assert D.head.shared.out_features == (1 if terms else 8)
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="maem_gan")
    # the EMA is a copy at step 1 and an average from step 2: it differs from G, and samples use it
    differs = [k for k in ckpt["G"] if ckpt["G"][k].is_floating_point() and not torch.equal(ckpt["G"][k], ckpt["G_ema"][k])]
    assert differs
    sample = maem_gan.load_sampler(os.path.join(out, "ckpt.pt"))
    G = maem_gan.build_networks(argparse_ns(args), 3)[0]
    G.load_state_dict(ckpt["G_ema"])
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    got = sample(3)
    with torch.no_grad():
        assert not torch.allclose(got, G.eval()(z), atol=1e-4)       # not the running statistics
        for m in G.modules():                                       # the batch's, as BigGAN-PyTorch
            if isinstance(m, torch.nn.BatchNorm2d):                 # (spectral norm stays in eval:
                m.train()                                           # no power iteration)
        assert torch.allclose(got, G(z), atol=1e-6)


def test_ema_is_a_copy_until_ema_start(tmp_path, monkeypatch):
    write_cifar(str(tmp_path / "data"), "cifar10", n=12)
    monkeypatch.setattr(maem_gan, "final_metrics", lambda *a: {})
    out = str(tmp_path / "run")
    maem_gan.main([*BIGGAN_TINY, "--data-root", str(tmp_path / "data"), "--steps", "2", "--out", out,
                   "--ema-start", "2", "--no-dlle"])
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="maem_gan")
    assert all(torch.equal(ckpt["G"][k], ckpt["G_ema"][k]) for k in ckpt["G"])


def argparse_ns(d):
    import argparse

    return argparse.Namespace(**d)


def test_scalar_head_on_2d_data_has_no_code_to_check(tmp_path):
    out = str(tmp_path / "ring")
    maem_gan.main(["--dataset", "ring", "--scalar-head", "--no-entropy", "--no-dlle", "--no-disomap", "--steps", "2",
                   "--log-every", "1", "--ckpt-every", "2", "--sample-every", "2", "--batch-size", "16",
                   "--eval-samples", "200", "--fig3-samples", "50", "--out", out, "--device", "cpu"])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert "modes" in metrics and "code_dims" not in metrics           # no m-dim code to measure


def test_backbone_presets_need_their_dataset(capsys):
    with pytest.raises(SystemExit) as err:
        maem_gan.parse_args(["--dataset", "celeba", "--arch", "biggan"])
    assert err.value.code == 2 and "cifar10 --arch biggan" in capsys.readouterr().err


# ---------------------------------------------------------------- the script, tiny StyleGAN2
def write_faces(root, n=12):
    from test_common import write_png

    os.makedirs(root, exist_ok=True)
    for i in range(n):
        write_png(os.path.join(root, f"{i:02d}.png"), (20 * i, 100, 255 - 20 * i), size=(20, 20))


SG2_TINY = ["--dataset", "ffhq", "--arch", "stylegan2", "--img-size", "16", "--width", "2", "--z-dim", "8",
            "--m", "2", "--batch-size", "4", "--r1-every", "2", "--pl-every", "2", "--log-every", "1",
            "--ckpt-every", "2", "--sample-every", "2", "--fig3-samples", "8", "--eval-samples", "8",
            "--device", "cpu"]


@pytest.mark.parametrize("terms", [[], ["--no-entropy", "--no-dlle", "--no-disomap", "--scalar-head"]])
def test_stylegan2_steps_with_lazy_regularisers(tmp_path, monkeypatch, terms):
    write_faces(str(tmp_path / "faces"))
    monkeypatch.setattr(maem_gan, "final_metrics", lambda *a: {})
    calls = {"r1": 0, "pl": []}
    real_r1, real_pl = maem_gan.r1_loss, common.path_length_penalty

    def r1_spy(D, x):
        calls["r1"] += 1
        return real_r1(D, x)

    def pl_spy(G, z, pl_mean, **kw):
        calls["pl"].append(z.shape[0])
        return real_pl(G, z, pl_mean, **kw)

    monkeypatch.setattr(maem_gan, "r1_loss", r1_spy)
    monkeypatch.setattr(common, "path_length_penalty", pl_spy)
    out = str(tmp_path / "run")
    maem_gan.main([*SG2_TINY, "--data-root", str(tmp_path / "faces"), "--steps", "4", "--out", out, *terms])
    args = json.load(open(os.path.join(out, "args.json")))
    # paper256's recipe, EMA half-life 20 kimg at batch 4
    assert (args["loss"], args["lr"], args["r1_gamma"], args["pl_weight"], args["style_mixing"]) == \
        ("ns", 0.0025, 1.0, 2.0, 0.9)
    assert args["ema"] == pytest.approx(0.5 ** (4 / 20_000))
    # lazy: R1 after D steps 0 and 2, path length after G steps 0 and 2 on half the batch
    assert calls["r1"] == 2 and calls["pl"] == [2, 2]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="maem_gan")
    c_d, c_g = 2 / 3, 2 / 3                                     # every / (every + 1)
    group_d, group_g = ckpt["opt_d"]["param_groups"][0], ckpt["opt_g"]["param_groups"][0]
    assert group_d["lr"] == pytest.approx(0.0025 * c_d) and group_g["lr"] == pytest.approx(0.0025 * c_g)
    assert group_d["betas"][1] == pytest.approx(0.99 ** c_d) and group_g["betas"][1] == pytest.approx(0.99 ** c_g)
    assert ckpt["pl_mean"][0] > 0                               # the running mean moved off 0
    lines = log_lines(out)
    assert "r1" in lines[0] and "pl" in lines[0] and "r1" not in lines[1]
    assert ("ent" in lines[-1]) != bool(terms)


@pytest.mark.parametrize("backbone", ["biggan", "stylegan2"])
def test_resume_is_bit_exact(tmp_path, backbone):
    if backbone == "biggan":
        write_cifar(str(tmp_path / "data"), "cifar10", n=12)
        flags = [*BIGGAN_TINY, "--data-root", str(tmp_path / "data"), "--seed", "2", "--eval-samples", "4"]
    else:                                   # an image folder: the DataLoader path of BatchStream
        write_faces(str(tmp_path / "data"))
        flags = [*SG2_TINY, "--data-root", str(tmp_path / "data"), "--seed", "1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    maem_gan.main([*flags, "--steps", "4", "--out", full])
    maem_gan.main([*flags, "--steps", "2", "--out", part])
    maem_gan.main([*flags, "--steps", "4", "--out", part, "--resume"])
    a = common.load_checkpoint(os.path.join(full, "ckpt.pt"))
    b = common.load_checkpoint(os.path.join(part, "ckpt.pt"))
    for net in ("G", "D", "G_ema"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
    assert torch.equal(a["pl_mean"][0], b["pl_mean"][0])
    assert [dict(x, it_s=0) for x in log_lines(full)] == [dict(x, it_s=0) for x in log_lines(part)]


def test_stylegan2_checkpoint_from_before_the_official_resampling_is_refused(tmp_path, capsys):
    # Issue 27: weights trained with bilinear / box resampling do not fit the FIR networks.
    write_faces(str(tmp_path / "faces"))
    flags = [*SG2_TINY, "--data-root", str(tmp_path / "faces"), "--out", str(tmp_path / "run")]
    maem_gan.main([*flags, "--steps", "2"])
    path = str(tmp_path / "run" / "ckpt.pt")
    ckpt = common.load_checkpoint(path)
    assert ckpt.pop("sg2_resampling") == maem_gan.SG2_RESAMPLING
    common.save_checkpoint(path, ckpt)                    # what maem_gan.py wrote before the FIR
    with pytest.raises(SystemExit) as exc:
        common.run_cli(maem_gan.main, [*flags, "--steps", "4", "--resume"])
    assert exc.value.code == 2 and "[1,3,3,1]" in capsys.readouterr().err
    with pytest.raises(common.UsageError, match="older maem_gan.py"):
        maem_gan.load_sampler(path)


def test_one_d_forward_keeps_minibatch_std_within_each_part():
    args = maem_gan.parse_args(["--dataset", "ffhq", "--arch", "stylegan2", "--img-size", "8", "--width", "2",
                                "--z-dim", "8", "--scalar-head", "--no-entropy", "--no-dlle", "--no-disomap"])
    _, D = maem_gan.build_networks(args, 3)
    assert D.mbstd.group_size == 8                              # paper256: groups of 8
    x, fake = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8) * 3
    _, terms = maem_gan.d_step_loss(D, D, x, fake, args, maem_gan.make_buffers(args, 8, "cpu"), 0.0)
    r_real, r_fake = D(x)[:, 0], D(fake)[:, 0]                  # separate calls, as the official code
    expected = F.softplus(r_fake).mean() + F.softplus(-r_real).mean()
    assert terms["adv"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_torchrun_stylegan2_with_r1_and_path_length(tmp_path):
    from conftest import run_torchrun

    write_faces(str(tmp_path / "faces"))
    out = str(tmp_path / "ddp")
    flags = [f if f != "--m" else "--code-dim" for f in SG2_TINY]     # torchrun reads --m as its own
    proc = run_torchrun(2, ["maem_gan.py", *flags, "--data-root", str(tmp_path / "faces"), "--steps", "2",
                            "--batch-size", "8", "--out", out], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = common.load_checkpoint(os.path.join(out, "ckpt.pt"), method="maem_gan")
    assert ckpt["step"] == 2 and len(ckpt["pl_mean"]) == 2
    assert not torch.equal(ckpt["pl_mean"][0], ckpt["pl_mean"][1])      # per-rank running means


def test_stylegan2_recipe_follows_the_resolution():
    # stylegan2-ada-pytorch train.py cfg_specs: paper256, paper512, stylegan2 (config F, 1024)
    def parsed(*flags):
        a = maem_gan.parse_args(["--dataset", "ffhq", "--arch", "stylegan2", *flags])
        return a, maem_gan.stylegan2_preset(a.img_size)[0]

    a, cfg = parsed()
    assert (a.img_size, a.batch_size, a.lr, a.r1_gamma, cfg["channel_base"], cfg["mbstd_group"]) == \
        (256, 64, 0.0025, 1.0, 16384, 8)
    a, cfg = parsed("--img-size", "512")
    assert (a.batch_size, a.lr, a.r1_gamma, cfg["channel_base"]) == (64, 0.0025, 0.5, 32768)
    a, cfg = parsed("--img-size", "1024")
    assert (a.batch_size, a.lr, a.r1_gamma, cfg["channel_base"], cfg["mbstd_group"]) == (32, 0.002, 10.0, 32768, 4)
    assert a.ema == pytest.approx(0.5 ** (32 / 10_000)) and a.steps == 25_000_000 // 32
    anime = maem_gan.parse_args(["--dataset", "animeface", "--arch", "stylegan2"])
    assert anime.img_size == 64 and anime.m == 32 and anime.lambda_norm == 5.0   # Suppl.'s AnimeFace
