"""Tests for the StyleGAN2 subsection of common.py (networks and regularisers).

Tiny sizes on CPU: img_size 8 / 16, channel_base 256, channel_max 32, z 16, batch 4.
Each test names, in its docstring, the bug it is there to catch.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import common

B, Z = 4, 16
SMALL = dict(channel_base=256, channel_max=32)
TAPS = torch.tensor([1.0, 3.0, 3.0, 1.0])
FIR = torch.outer(TAPS, TAPS) / 64  # the official [1,3,3,1] low-pass, written out here


def _fir(x, pad, gain=1.0):
    """Slow reference: every channel of x zero-padded by pad = (left, right, top, bottom), filtered."""
    c = x.shape[1]
    return F.conv2d(F.pad(x, pad), (FIR * gain).expand(c, 1, 4, 4), groups=c)


def _gen(img_size=8, **kw):
    torch.manual_seed(0)
    return common.StyleGAN2Generator(Z, img_size, **SMALL, **kw)


def _modconv(c_in, c_out, k, w_dim, **kw):
    torch.manual_seed(0)
    layer = common.ModulatedConv2d(c_in, c_out, k, w_dim, **kw)
    with torch.no_grad():  # styles away from their init value 1, different per channel
        layer.affine.bias.normal_(1.0, 0.5)
    return layer


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("up", [False, True])
def test_modulated_conv_matches_hand_computation(demodulate, up):
    """Per sample: s = affine(w), w'_oik = s_i W_oik / sqrt(c_in k k), w'' = w' / sqrt(sum_ik w'^2
    + 1e-8), one F.conv2d per sample; up: the input with zeros inserted after each pixel, padded
    2 / 1, correlated with w'' (the official transposed conv), then the filter x 4 padded by 1.
    Catches: no / wrong-axis demodulation, missing fan-in scale (demodulate=False), styles applied
    to the wrong axis, a grouped-conv reshape mixing samples, the transposed conv's weight layout
    (c_in / c_out swapped) or kernel not flipped, the filter's gain or padding."""
    c_in, c_out, k, w_dim = 3, 5, 3, 4
    layer = _modconv(c_in, c_out, k, w_dim, demodulate=demodulate, up=up)
    x, w = torch.randn(2, c_in, 6, 6), torch.randn(2, w_dim)
    A = layer.affine
    out = layer(x, w)
    for b in range(2):
        s = w[b] @ (A.weight / math.sqrt(w_dim)).T + A.bias  # (c_in,), lr_mult 1
        wt = torch.empty(c_out, c_in, k, k)
        for o in range(c_out):
            for i in range(c_in):
                wt[o, i] = s[i] * layer.weight[o, i] / math.sqrt(c_in * k * k)
            if demodulate:
                wt[o] = wt[o] / torch.sqrt((wt[o] ** 2).sum() + 1e-8)
        xb = x[b:b + 1]
        if up:
            zeros = torch.zeros(1, c_in, 12, 12)
            zeros[:, :, ::2, ::2] = xb
            ref = _fir(F.conv2d(F.pad(zeros, (2, 1, 2, 1)), wt), (1, 1, 1, 1), gain=4.0)  # 13x13 -> 12x12
        else:
            ref = F.conv2d(xb, wt, padding=k // 2)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5)
    assert out.shape == (2, c_out, 12 if up else 6, 12 if up else 6)


def test_demodulation_normalises_and_ignores_style_scale():
    """Unit-variance i.i.d. input -> unit std per output channel (interior pixels) even with styles
    ~50, and scaling all styles by 7 changes nothing. c_in != c_out so demodulating over the wrong
    axis (output channels) gives std ~ sqrt(c_in / c_out) instead of 1."""
    c_in, c_out = 64, 8
    layer = _modconv(c_in, c_out, 3, 4)
    with torch.no_grad():
        layer.affine.bias.mul_(50.0)
    torch.manual_seed(1)
    x, w = torch.randn(2, c_in, 24, 24), torch.randn(2, 4)
    with torch.no_grad():
        out = layer(x, w)
        std = out[:, :, 1:-1, 1:-1].transpose(0, 1).reshape(c_out, -1).std(dim=1)  # (c_out,)
        assert torch.allclose(std, torch.ones(c_out), atol=0.15), std
        layer.affine.weight.mul_(7.0)
        layer.affine.bias.mul_(7.0)
        torch.testing.assert_close(layer(x, w), out, rtol=1e-5, atol=1e-5)


def _mbstd_by_hand(x, group_size, n_channels):
    Bn, C, H, W = x.shape
    G = min(group_size, Bn)
    n = Bn // G  # number of groups; sample b is in group b % n (official (G, n) split)
    c = C // n_channels
    extra = torch.empty(Bn, n_channels, H, W)
    for b in range(Bn):
        members = [j for j in range(Bn) if j % n == b % n]
        assert len(members) == G
        for f in range(n_channels):
            vals = x[members][:, f * c:(f + 1) * c]  # (G, c, H, W)
            std = torch.sqrt(((vals - vals.mean(0)) ** 2).mean(0) + 1e-8)  # biased std over the group
            extra[b, f] = std.mean()
    return torch.cat([x, extra], dim=1)


@pytest.mark.parametrize("group_size,batch", [(2, 4), (4, 4), (4, 8), (2, 8), (8, 4)])
@pytest.mark.parametrize("n_channels", [1, 2])
def test_minibatch_std_matches_hand_computation(group_size, batch, n_channels):
    """Catches contiguous instead of strided groups, unbiased std, a missing eps, averaging over
    the wrong axes, and channel groups split the wrong way."""
    torch.manual_seed(0)
    x = torch.randn(batch, 4, 3, 3) * torch.arange(1.0, 5.0).view(1, 4, 1, 1)  # channels differ in scale
    out = common.MinibatchStd(group_size, n_channels)(x)
    assert out.shape == (batch, 4 + n_channels, 3, 3)
    torch.testing.assert_close(out, _mbstd_by_hand(x, group_size, n_channels))


def test_minibatch_std_batch_not_divisible_is_a_usage_error():
    with pytest.raises(common.UsageError, match="must divide"):
        common.MinibatchStd(4)(torch.randn(6, 2, 3, 3))


def test_minibatch_std_eps_keeps_identical_samples_finite():
    """A group of identical samples has std sqrt(1e-8) = 1e-4, not 0, and a finite gradient
    (the official eps inside the square root)."""
    x = torch.ones(4, 2, 3, 3, requires_grad=True)
    out = common.MinibatchStd(4, 1)(x)
    torch.testing.assert_close(out[:, 2:].detach(), torch.full((4, 1, 3, 3), 1e-4), rtol=1e-3, atol=0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("lr_mult", [1.0, 0.01])
def test_equal_linear_scales_at_run_time(lr_mult):
    """Effective weight = stored * lr_mult / sqrt(in_f), bias = stored * lr_mult; stored N(0, 1) /
    lr_mult. Catches a forgotten 1/sqrt(fan_in), lr_mult on one of the two only, wrong bias_init."""
    torch.manual_seed(0)
    layer = common.EqualLinear(64, 32, lr_mult=lr_mult, bias_init=0.5)
    assert abs(layer.weight.std().item() * lr_mult - 1.0) < 0.1
    torch.testing.assert_close(layer.bias, torch.full((32,), 0.5))
    x = torch.randn(3, 64)
    ref = F.linear(x, layer.weight * lr_mult / math.sqrt(64), layer.bias * lr_mult)
    torch.testing.assert_close(layer(x), ref)


def test_equal_conv_scales_at_run_time_and_downsamples():
    """Effective weight = stored / sqrt(c_in k k); down=True as the official layer: the filter
    padded by 2, then the 3x3 conv with stride 2; a 1x1 conv: the filter padded by 1, every second
    pixel, then the conv. Catches: a box filter, padding off by one, the grid shifted by a pixel."""
    torch.manual_seed(0)
    conv = common.EqualConv2d(4, 6, 3, down=True)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 4, 8, 8)
    ref = F.conv2d(_fir(x, (2, 2, 2, 2)), conv.weight / math.sqrt(4 * 9), conv.bias, stride=2)
    torch.testing.assert_close(conv(x), ref)
    skip = common.EqualConv2d(4, 6, 1, bias=False, down=True)
    ref = F.conv2d(_fir(x, (1, 1, 1, 1))[:, :, ::2, ::2], skip.weight / 2.0)
    torch.testing.assert_close(skip(x), ref)
    assert conv(x).shape == skip(x).shape == (2, 6, 4, 4)
    assert common.EqualConv2d(4, 6, 1, bias=False).bias is None


def test_mapping_network_normalises_z_and_keeps_scale():
    """w does not depend on the scale of z (2nd-moment normalisation) and its second moment stays
    O(1) through 8 layers (sqrt(2)-gain leaky ReLU: x1.04 per layer; without the gain x0.52, so
    ~0.005 after 8). Also the 8 layers and the 0.01 learning-rate multiplier."""
    torch.manual_seed(0)
    net = common.MappingNetwork(64, 64).eval()
    assert len(net.layers) == 8 and all(layer.lr_mult == 0.01 for layer in net.layers)
    z = torch.randn(256, 64)
    with torch.no_grad():
        w = net(z)
        torch.testing.assert_close(net(5.0 * z), w, rtol=1e-4, atol=1e-5)
    assert w.shape == (256, 64) and 0.7 < w.square().mean().item() < 2.5


# ------------------------------------------------------------------------------------------------
# Generator and discriminator
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [8, 16])
def test_shapes(img_size):
    G = _gen(img_size)
    img, ws = G(torch.randn(B, Z), return_ws=True)
    assert img.shape == (B, 3, img_size, img_size)
    assert ws.shape == (B, 2 * int(math.log2(img_size)) - 2, Z) == (B, G.num_ws, G.w_dim)
    D = common.StyleGAN2Discriminator(img_size, out_dim=6, **SMALL)
    assert D(img).shape == (B, 6)  # MaEM-GAN's 2m-dim head
    assert common.StyleGAN2Discriminator(img_size, channels=1, **SMALL)(img[:, :1]).shape == (B, 1)
    G1 = common.StyleGAN2Generator(Z, img_size, channels=1, w_dim=8, **SMALL)
    assert G1(torch.randn(B, Z), y=torch.zeros(B, dtype=torch.long)).shape == (B, 1, img_size, img_size)


@pytest.mark.parametrize("cls", ["G", "D"])
def test_bad_img_size_is_a_usage_error(cls):
    with pytest.raises(common.UsageError, match="power of two"):
        if cls == "G":
            common.StyleGAN2Generator(Z, 12, **SMALL)
        else:
            common.StyleGAN2Discriminator(12, **SMALL)


def test_parameter_counts_match_the_official_networks():
    """Config F at 1024 (built on the meta device: no memory, no init cost). The official
    stylegan2-ada-pytorch module summary gives 29,012,513 for D and, with an 8-layer mapping,
    30,370,060 for G (its auto config's 2-layer mapping prints 28,794,124 = 30,370,060 - 6 x 262,656).
    Catches wrong channel formulas, a missing ToRGB / skip / bias, a wrong epilogue."""
    with torch.device("meta"):
        G = common.StyleGAN2Generator(512, 1024)
        D = common.StyleGAN2Discriminator(1024)
    assert common.count_params(G) == 30_370_060
    assert common.count_params(D) == 29_012_513


def test_init_follows_the_official_code():
    """Equalised-lr weights N(0, 1) (mapping: N(0, 1) / 0.01), biases 0, style affine biases 1,
    noise strengths 0, ToRGB without demodulation and every styled conv with it."""
    G, D = _gen(16), common.StyleGAN2Discriminator(16, **SMALL)
    layers = [m for net in (G, D) for m in net.modules()
              if isinstance(m, (common.EqualLinear, common.EqualConv2d, common.ModulatedConv2d))]
    affines = {id(m.affine) for m in layers if isinstance(m, common.ModulatedConv2d)}
    for m in layers:
        if id(m) in affines:
            assert torch.equal(m.bias, torch.ones_like(m.bias))
        elif getattr(m, "bias", None) is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    weights = [m.weight.detach().flatten() * getattr(m, "lr_mult", 1.0) for m in layers]
    w = torch.cat(weights)  # (all weights,), ~28k numbers
    assert abs(w.mean().item()) < 0.02 and abs(w.std().item() - 1.0) < 0.02
    assert all(not t.conv.demodulate for t in G.to_rgbs) and all(c.conv.demodulate for c in G.convs)
    assert all(c.noise.strength.item() == 0.0 for c in G.convs)


def test_discriminator_sees_its_minibatch_std_group():
    """mbstd_group=2, batch 4: sample 0's group is {0, 2} (official strided split), so D(x)[0]
    changes when x[2] changes and not when x[1] or x[3] do. Catches a D without the layer and
    contiguous groups."""
    torch.manual_seed(0)
    D = common.StyleGAN2Discriminator(8, mbstd_group=2, **SMALL)
    x = torch.randn(B, 3, 8, 8)
    with torch.no_grad():
        ref = D(x)[0]
        for j, changes in ((1, False), (2, True), (3, False)):
            x2 = x.clone()
            x2[j] += 1.0
            assert (not torch.allclose(D(x2)[0], ref)) == changes, j


def _mixing_cutoffs(ws):
    """For each sample the layer index where ws changes, or None if all layers are equal."""
    cuts = []
    for b in range(ws.shape[0]):
        diff = [i for i in range(1, ws.shape[1]) if not torch.equal(ws[b, i], ws[b, i - 1])]
        assert len(diff) <= 1  # two blocks at most: w1 up to the cutoff, w2 after it
        cuts.append(diff[0] if diff else None)
    return cuts


def test_style_mixing():
    """style_mixing=1 in train mode: every sample switches to a second w at one cutoff (the same
    for the whole batch); 0 or eval mode: all layers share one w."""
    G = _gen(16, style_mixing=1.0).train()
    seen = set()
    for _ in range(10):
        cuts = _mixing_cutoffs(G.mapping(torch.randn(B, Z)))
        assert None not in cuts and len(set(cuts)) == 1
        seen.add(cuts[0])
    assert seen <= set(range(1, G.num_ws)) and len(seen) > 1
    assert _mixing_cutoffs(G.eval().mapping(torch.randn(B, Z))) == [None] * B
    assert _mixing_cutoffs(_gen(16, style_mixing=0.0).train().mapping(torch.randn(B, Z))) == [None] * B


def test_w_avg_and_truncation():
    """w_avg <- 0.995 w_avg + 0.005 mean(w) in train mode only; truncation psi gives
    w_avg + psi (w - w_avg), so psi = 0 makes every z the same image."""
    G = _gen(8)
    z = torch.randn(B, Z)
    with torch.no_grad():
        G.mapping_net.w_avg.normal_()
        old = G.mapping_net.w_avg.clone()
        ws = G.eval().mapping(z)
        torch.testing.assert_close(G.mapping_net.w_avg, old)  # eval: untouched
        G.train().mapping(z)
        torch.testing.assert_close(G.mapping_net.w_avg, 0.995 * old + 0.005 * ws[:, 0].mean(0))
        G.eval()
        w_avg = G.mapping_net.w_avg
        torch.testing.assert_close(G.mapping(z, truncation=0.7), w_avg + 0.7 * (ws - w_avg))
        img = G(z, truncation=0.0, noise_mode="const")
        torch.testing.assert_close(img, img[:1].expand_as(img))


def test_noise_modes():
    G = _gen(8).eval()
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, common.NoiseInjection):
                assert m.strength.item() == 0.0  # the official init
                m.strength.fill_(1.0)
        z = torch.randn(B, Z)
        assert torch.equal(G(z, noise_mode="const"), G(z, noise_mode="const"))
        assert torch.equal(G(z, noise_mode="none"), G(z, noise_mode="none"))
        assert not torch.equal(G(z, noise_mode="random"), G(z, noise_mode="random"))
        assert not torch.equal(G(z, noise_mode="const"), G(z, noise_mode="none"))


# ------------------------------------------------------------------------------------------------
# Regularisers
# ------------------------------------------------------------------------------------------------


def test_r1_penalty_closed_form():
    """scores_b = <x_b, a>: grad = a for every sample, so R1 = ||a||^2 (mean over the batch, sum
    of squares over C, H, W) and dR1/da = 2a (needs create_graph=True). scores_b = sum x_b^2:
    grad 2 x_b, R1 = mean_b ||2 x_b||^2. Catches sum over the batch, mean over pixels, a missing
    square, no create_graph."""
    torch.manual_seed(0)
    a = torch.randn(3 * 4 * 4, requires_grad=True)
    x = torch.randn(B, 3, 4, 4, requires_grad=True)
    r1 = common.r1_penalty(x.flatten(1) @ a, x)
    torch.testing.assert_close(r1, a.detach().square().sum())
    (g,) = torch.autograd.grad(r1, a)
    torch.testing.assert_close(g, 2 * a.detach())
    r1 = common.r1_penalty(x.square().sum(dim=(1, 2, 3)), x)
    torch.testing.assert_close(r1, (2 * x.detach()).square().sum(dim=(1, 2, 3)).mean())


def _lengths_by_hand(G, z, noise):
    ws = G.mapping(z).detach().requires_grad_(True)
    img = G.synthesis(ws)
    (g,) = torch.autograd.grad((img * noise).sum(), ws)  # (B, num_ws, w_dim)
    return torch.stack([torch.sqrt(sum((g[b, l] ** 2).sum() for l in range(ws.shape[1])) / ws.shape[1])
                        for b in range(z.shape[0])])


def test_path_length_penalty():
    """lengths = sqrt(mean_l sum_d g^2) against a direct autograd recomputation; pl_mean moves by
    `decay` toward their mean; penalty = mean((lengths - new pl_mean)^2), differentiable w.r.t.
    G's weights; the default y is N(0, 1) / sqrt(H W). Catches averaging over the wrong axis, a
    decay applied the wrong way round, a missing create_graph, y not scaled."""
    G = _gen(8).eval()  # eval: no style mixing, no w_avg update (deterministic mapping)
    z = torch.randn(B, Z)
    noise = torch.randn(B, 3, 8, 8)
    lengths = _lengths_by_hand(G, z, noise)
    pl_mean = torch.tensor(0.5)
    penalty, mean_len = common.path_length_penalty(G, z, pl_mean, decay=0.01, noise=noise)
    torch.testing.assert_close(mean_len, lengths.mean())
    new_mean = 0.5 + 0.01 * (lengths.mean() - 0.5)
    torch.testing.assert_close(pl_mean, new_mean)
    torch.testing.assert_close(penalty.detach(), (lengths - new_mean).square().mean())
    penalty.backward()
    w = G.convs[-1].conv.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert G.mapping_net.layers[0].weight.grad.abs().sum() > 0

    torch.manual_seed(3)  # default y: the draw after G's own noise draws
    _, mean_len = common.path_length_penalty(G, z, torch.tensor(0.0))
    torch.manual_seed(3)
    img = G.synthesis(G.mapping(z))
    y = torch.randn_like(img) / 8.0  # sqrt(H W) = 8
    torch.testing.assert_close(mean_len, _lengths_by_hand(G, z, y).mean())


def test_gradients_reach_every_parameter():
    """One G + D backward with R1 and path length, G in train mode with style mixing. Every
    parameter gets a non-zero gradient: noise strengths too (noise_mode "random"; with "const"
    or "none" they would get zero / none, by design), the const input, the mapping network."""
    G = _gen(8, style_mixing=0.9).train()
    D = common.StyleGAN2Discriminator(8, **SMALL)
    z = torch.randn(B, Z)
    x_real = torch.randn(B, 3, 8, 8, requires_grad=True)
    loss = F.softplus(-D(G(z))).mean() + F.softplus(D(x_real)).mean()
    loss = loss + common.r1_penalty(D(x_real).squeeze(1), x_real)
    loss = loss + common.path_length_penalty(G, z[:2], torch.zeros([]))[0]
    loss.backward()
    for name, net in (("G", G), ("D", D)):
        for pname, p in net.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"
