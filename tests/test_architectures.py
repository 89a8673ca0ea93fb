"""Tests for section 6 of common.py (architectures, init, EMA).

Everything runs on CPU with tiny widths and batch 2 so the file stays well under 30 s.
"""

import io
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import common

B = 2
Z = 8

# (arch, sizes, small width) for the image architectures.
IMAGE_ARCHS = [
    ("dcgan", (32, 64, 128, 256), 4),
    ("resnet", (32, 48, 64, 128), 4),
    ("invert-resnet", (32, 48), 4),
]
IMAGE_CASES = [(arch, size, width) for arch, sizes, width in IMAGE_ARCHS for size in sizes]


def _weight_layers(module):
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]


def _has_sn(layer):
    return parametrize.is_parametrized(layer, "weight")


def _randomise_cond_bn(module, seed=0):
    """Conditional BN starts with gain 1 / bias 0 for every class; give each class its own."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, common.CondBatchNorm2d) and m.n_classes > 0:
                m.gain.weight.copy_(1 + 0.5 * torch.randn(m.gain.weight.shape, generator=gen))
                m.bias.weight.copy_(0.5 * torch.randn(m.bias.weight.shape, generator=gen))
                n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Shapes and ranges
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,size,width", IMAGE_CASES)
def test_generator_and_discriminator_shapes(arch, size, width):
    torch.manual_seed(0)
    G = common.build_generator(arch, Z, size, 3, width=width)
    D = common.build_discriminator(arch, size, 3, width=width, out_dim=5)
    x = G(torch.randn(B, Z))
    assert x.shape == (B, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert x.std() > 0  # not a constant image
    assert D(x).shape == (B, 5)


@pytest.mark.parametrize("size", (32, 48))
def test_encoder_shapes(size):
    F_net = common.build_encoder("invert-resnet", size, 1, out_dim=7, width=4)
    assert F_net(torch.randn(B, 1, size, size)).shape == (B, 7)
    assert isinstance(F_net, common.ResNetEncoder)


def test_grayscale_channels():
    G = common.build_generator("dcgan", Z, 32, 1, width=4)
    D = common.build_discriminator("resnet", 32, 1, width=4)
    assert G(torch.randn(B, Z)).shape == (B, 1, 32, 32)
    assert D(torch.randn(B, 1, 32, 32)).shape == (B, 1)


def test_mlp_four_linear_layers_and_flat_output():
    # InvertGAN Sec 5.1: four linear layers with ReLU, nothing after the last layer.
    G = common.build_generator("mlp", 2, 1, 2)
    linears = [m for m in G.modules() if isinstance(m, nn.Linear)]
    relus = [m for m in G.modules() if isinstance(m, nn.ReLU)]
    assert len(linears) == 4 and len(relus) == 3
    assert [l.out_features for l in linears] == [128, 128, 128, 2]
    out = G(torch.randn(B, 2))
    assert out.shape == (B, 2)
    # No tanh: a large last-layer bias passes straight through (2-D data is unbounded).
    with torch.no_grad():
        G.head.shared.bias.fill_(5.0)
    assert G(torch.randn(B, 2)).min() > 1.5
    D = common.build_discriminator("mlp", 1, 2, width=16)
    F_net = common.build_encoder("mlp", 1, 2, out_dim=2, width=16)
    assert D(torch.randn(B, 2)).shape == (B, 1)
    assert F_net(torch.randn(B, 2)).shape == (B, 2)


def test_maxout_mlp_is_the_max_of_its_linear_pieces():
    # Maxout (Goodfellow et al. 2013): unit j = max_p (W x + b)[j * pieces + p], by hand.
    layer = common.Maxout(3, 4, pieces=5)
    x = torch.randn(B, 3)
    lin = x @ layer.lin.weight.T + layer.lin.bias                  # (B, 20)
    want = torch.stack([lin[:, 5 * j:5 * j + 5].max(1).values for j in range(4)], 1)
    assert torch.allclose(layer(x), want)
    # The official PGMGAN 2-D D: three maxout layers of `width` units, then the heads.
    D = common.build_discriminator("mlp", 1, 2, width=16, n_classes=3, mlp_act="maxout")
    maxouts = [m for m in D.modules() if isinstance(m, common.Maxout)]
    assert len(maxouts) == 3 and [m.lin.out_features for m in maxouts] == [80, 80, 80]
    assert not any(isinstance(m, nn.ReLU) for m in D.modules())
    assert D(torch.randn(B, 2), torch.zeros(B, dtype=torch.long)).shape == (B, 1)
    assert D(torch.randn(B, 2)).shape == (B, 3, 1)


# ---------------------------------------------------------------------------------------------
# Paper layouts at width 64
# ---------------------------------------------------------------------------------------------


def test_dcgan_cifar_layout_matches_paper():
    G = common.DCGANGenerator(64, 32)  # width 64
    D = common.DCGANDiscriminator(32, out_dim=16)
    g = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in g] == [512, 256, 128, 3]
    assert [m.kernel_size for m in g] == [(4, 4)] * 4
    assert [m.stride for m in g] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    d = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in d] == [128, 256, 512]
    assert all(m.kernel_size == (4, 4) and m.stride == (2, 2) for m in d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    assert D.head.shared.in_features == 512 * 4 * 4 and D.head.shared.out_features == 16


def test_dcgan_channel_cap():
    # Capped at 8*width by default, official (uncapped) layout with max_mult=None.
    assert common.DCGANGenerator(Z, 64, width=4).convs[0].out_channels == 32
    assert common.DCGANGenerator(Z, 64, width=4, max_mult=None).convs[0].out_channels == 64


def test_sngan_cifar_layout():
    G = common.ResNetGenerator(128, 32)
    D = common.ResNetDiscriminator(32)
    assert G.linear.out_features == 256 * 4 * 4
    assert len(G.blocks) == 3 and all(b.conv2.out_channels == 256 for b in G.blocks)
    assert [b.conv2.out_channels for b in D.blocks] == [128] * 4
    assert [b.downsample for b in D.blocks] == [True, True, False, False]
    assert D.blocks[0].first and not any(b.first for b in D.blocks[1:])


def test_stl10_resnet_starts_at_6x6():
    G = common.ResNetGenerator(Z, 48, width=4)
    assert G.bottom == 6 and len(G.blocks) == 3


def test_invertgan_tables_3_and_4():
    G = common.InvertResNetGenerator(128, 32)
    assert G.linear.out_features == 8192
    blocks = [(b.conv1.in_channels, b.conv1.out_channels, b.conv2.out_channels, b.shortcut is not None)
              for b in G.blocks]
    # Table 4: 3x3 256 / 3x3 256 / 1x1 256, then 128, 64, and a last 64 -> 64 block with no 1x1.
    assert blocks == [(512, 256, 256, True), (256, 128, 128, True), (128, 64, 64, True), (64, 64, 64, False)]
    F_net = common.ResNetEncoder(32, out_dim=20)
    blocks = [(b.conv1.in_channels, b.conv1.out_channels, b.conv2.out_channels, b.shortcut is not None)
              for b in F_net.blocks]
    # Table 3: 64/64, then 3x3 64 / 3x3 128 / 1x1 128, ...
    assert blocks == [(64, 64, 64, False), (64, 64, 128, True), (128, 128, 256, True), (256, 256, 512, True)]
    assert F_net.linear.in_features == 512 * 4 * 4 and F_net.linear.out_features == 20
    assert common.InvertResNetGenerator(Z, 48, width=4).linear.out_features == 32 * 6 * 6


# ---------------------------------------------------------------------------------------------
# Spectral norm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,size,width", [c for c in IMAGE_CASES if c[0] != "invert-resnet"]
                         + [("invert-resnet", 32, 4)])
def test_spectral_norm_on_every_d_layer_and_never_on_g(arch, size, width):
    D = common.build_discriminator(arch, size, 3, width=width, n_classes=3)
    G = common.build_generator(arch, Z, size, 3, width=width)
    d_layers, g_layers = _weight_layers(D), _weight_layers(G)
    assert len(d_layers) >= 4 and len(g_layers) >= 4
    assert all(_has_sn(m) for m in d_layers)
    assert not any(_has_sn(m) for m in g_layers)


def test_sn_options():
    assert not any(_has_sn(m) for m in _weight_layers(common.DCGANDiscriminator(32, width=4, spectral_norm=False)))
    G = common.ResNetGenerator(Z, 32, width=4, spectral_norm=True)
    assert all(_has_sn(m) for m in _weight_layers(G))
    assert not any(_has_sn(m) for m in _weight_layers(common.build_discriminator("mlp", 1, 2)))


def test_spectral_norm_bounds_top_singular_value():
    torch.manual_seed(0)
    D = common.ResNetDiscriminator(32, width=4)
    D.train()
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        for _ in range(30):  # one power iteration per training forward
            D(x)
    D.eval()
    for m in _weight_layers(D):
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1.0) < 0.05


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,size,channels", [("dcgan", 32, 3), ("resnet", 32, 3), ("mlp", 1, 2)])
def test_conditional_generator_depends_on_label(arch, size, channels):
    torch.manual_seed(0)
    G = common.build_generator(arch, Z, size, channels, width=4, n_classes=5).eval()
    if arch != "mlp":
        assert _randomise_cond_bn(G) > 0
    z = torch.randn(1, Z).repeat(4, 1)
    out = G(z, torch.tensor([0, 3, 0, 3]))
    assert torch.allclose(out[0], out[2]) and torch.allclose(out[1], out[3])
    assert (out[0] - out[1]).abs().max() > 1e-3
    with pytest.raises(ValueError):
        G(z)


def test_conditional_bn_starts_as_plain_bn():
    bn = common.CondBatchNorm2d(4, n_classes=3).eval()
    x = torch.randn(B, 4, 2, 2)
    assert torch.allclose(bn(x, torch.tensor([0, 2])), bn.bn(x))


@pytest.mark.parametrize("arch,size,channels", [("dcgan", 32, 3), ("resnet", 32, 3), ("mlp", 1, 2)])
def test_conditional_discriminator_selects_head(arch, size, channels):
    torch.manual_seed(0)
    K, out_dim = 4, 3
    D = common.build_discriminator(arch, size, channels, width=4, out_dim=out_dim, n_classes=K).eval()
    x = torch.randn(B, channels, size, size) if arch != "mlp" else torch.randn(B, channels)
    y = torch.tensor([3, 1])
    all_heads = D(x)
    assert all_heads.shape == (B, K, out_dim)
    picked = D(x, y)
    assert picked.shape == (B, out_dim)
    assert torch.allclose(picked, all_heads[torch.arange(B), y])
    assert not torch.allclose(all_heads[:, 0], all_heads[:, 1])  # the heads really differ


def test_unconditional_discriminator_ignores_missing_label():
    D = common.build_discriminator("resnet", 32, 3, width=4, out_dim=2).eval()
    assert D(torch.randn(B, 3, 32, 32)).shape == (B, 2)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda: common.build_generator("dcgan", Z, 48, 3),
    lambda: common.build_discriminator("dcgan", 16, 3),
    lambda: common.build_generator("resnet", Z, 96, 3),
    lambda: common.build_discriminator("resnet", 256, 3),
    lambda: common.build_generator("invert-resnet", Z, 64, 3),
    lambda: common.build_encoder("invert-resnet", 64, 3, 2),
    lambda: common.build_generator("mlp", Z, 32, 3),
    lambda: common.build_generator("stylegan", Z, 32, 3),
    lambda: common.build_encoder("dcgan", 32, 3, 2),
    lambda: common.build_generator("invert-resnet", Z, 32, 3, n_classes=3),
])
def test_unsupported_configurations_raise_usage_error(call):
    with pytest.raises(common.UsageError) as err:
        call()
    assert "\n" not in str(err.value) and str(err.value)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    G = common.DCGANGenerator(64, 32)  # convs[1]: 512 x 256 x 4 x 4 = 2M weights
    w = G.convs[1].weight
    assert abs(w.std().item() - 0.02) < 5e-4 and abs(w.mean().item()) < 5e-4
    bn = G.norms[0].bn
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.01
    assert torch.all(bn.bias == 0)
    D = common.DCGANDiscriminator(32)
    w = D.convs[2].parametrizations.weight.original  # raw weight under spectral norm
    assert abs(w.std().item() - 0.02) < 5e-4
    head = D.head.shared.parametrizations.weight.original  # (1, 8192): orthogonal -> unit norm row
    assert abs(head.norm().item() - 1.0) < 1e-4


def test_sngan_init_statistics():
    torch.manual_seed(0)
    D = common.ResNetDiscriminator(32, width=64)
    blk = D.blocks[1]

    def xavier_std(w, gain):
        fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    w1 = blk.conv1.parametrizations.weight.original
    assert abs(w1.std().item() / xavier_std(w1, math.sqrt(2)) - 1) < 0.03
    ws = blk.shortcut.parametrizations.weight.original
    assert abs(ws.std().item() / xavier_std(ws, 1.0) - 1) < 0.05
    assert torch.all(blk.conv1.bias == 0)
    # CBN gains start at 1 in every scheme.
    G = common.ResNetGenerator(Z, 32, width=4, n_classes=3, init="n02")
    assert torch.all(G.blocks[0].bn1.gain.weight == 1) and torch.all(G.blocks[0].bn1.bias.weight == 0)
    assert abs(G.linear.weight.std().item() - 0.02) < 0.003
    with pytest.raises(ValueError):
        common.init_weights(G, "kaiming")


# ---------------------------------------------------------------------------------------------
# EMA, unwrap, count_params
# ---------------------------------------------------------------------------------------------


def _tiny():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_update_formula_and_buffers():
    torch.manual_seed(0)
    model = _tiny()
    ema = common.EMA(model, decay=0.9)
    assert not ema.shadow.training
    assert not any(p.requires_grad for p in ema.shadow.parameters())
    old = {k: v.clone() for k, v in ema.shadow.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(5, 3))  # moves the BN running statistics
    ema.update(model)
    for name, p in model.named_parameters():
        expected = 0.9 * old[name] + 0.1 * p.detach()
        assert torch.allclose(ema.shadow.state_dict()[name], expected, atol=1e-6)
    for name, b in model.named_buffers():
        assert torch.equal(ema.shadow.state_dict()[name], b)
    assert not torch.equal(old["1.running_mean"], ema.shadow.state_dict()["1.running_mean"])
    ema.update(model, decay=0.0)  # copy outright
    for name, p in model.named_parameters():
        assert torch.equal(ema.shadow.state_dict()[name], p.detach())


def test_ema_state_dict_roundtrip_weights_only():
    torch.manual_seed(0)
    G = common.ResNetGenerator(Z, 32, width=4, n_classes=2)  # includes CBN embeddings
    ema = common.EMA(G, decay=0.5)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    ema.update(G)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = common.EMA(common.ResNetGenerator(Z, 32, width=4, n_classes=2))
    fresh.load_state_dict(state)
    z, y = torch.randn(B, Z), torch.tensor([0, 1])
    assert torch.equal(fresh(z, y), ema(z, y))
    # ...and the state dict loads into a freshly built network for sampling.
    G2 = common.ResNetGenerator(Z, 32, width=4, n_classes=2).eval()
    G2.load_state_dict(state)
    assert torch.equal(G2(z, y), ema(z, y))


def test_ema_sn_discriminator_roundtrip():
    D = common.DCGANDiscriminator(32, width=4)
    ema = common.EMA(D)
    ema.update(D)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    common.DCGANDiscriminator(32, width=4).load_state_dict(torch.load(buf, weights_only=True))


def test_unwrap_compile_and_ddp():
    import torch.distributed as dist

    model = _tiny()
    compiled = torch.compile(model)  # lazy: nothing is compiled until called
    assert common.unwrap(compiled) is model
    ema = common.EMA(compiled, decay=0.5)
    assert set(ema.state_dict()) == set(model.state_dict())  # no `_orig_mod.` prefixes
    ema.update(compiled)

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert common.unwrap(ddp) is model
        ema = common.EMA(ddp, decay=0.5)
        assert set(ema.state_dict()) == set(model.state_dict())  # no `module.` prefixes
        with torch.no_grad():
            model[0].weight.add_(2.0)
        before = ema.shadow[0].weight.clone()
        ema.update(ddp)
        assert torch.allclose(ema.shadow[0].weight, 0.5 * before + 0.5 * model[0].weight)
    finally:
        dist.destroy_process_group()

    class HasModuleChild(nn.Module):  # a child *named* module is not a wrapper
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(1, 1)

    m = HasModuleChild()
    assert common.unwrap(m) is m


def test_count_params():
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # 8 + 3
    assert common.count_params(m) == 11
    m[1].requires_grad_(False)
    assert common.count_params(m, trainable_only=True) == 8
    assert common.count_params(torch.compile(m)) == 11


def test_dcgan_discriminator_conv_bias_option():
    """MaEM's official DCGAN D has no biases: it is positively homogeneous, D(c x) = c D(x) for
    c > 0. conv_bias=True (what pgm_gan.py builds) adds one bias per conv and breaks that."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    plain = common.DCGANDiscriminator(32, 3, width=8).eval()
    biased = common.DCGANDiscriminator(32, 3, width=8, conv_bias=True).eval()
    assert not any(n.endswith("bias") for n, _ in plain.named_parameters())
    assert sum(n.endswith("bias") for n, _ in biased.named_parameters()) == len(biased.convs)
    with torch.no_grad():
        for conv in biased.convs:
            conv.bias.fill_(0.1)
        assert torch.allclose(plain(3 * x), 3 * plain(x), atol=1e-5)
        assert not torch.allclose(biased(3 * x), 3 * biased(x), atol=1e-3)
    import pgm_gan
    args = pgm_gan.parse_args(["--dataset", "stacked-fashion-mnist", "--arch", "dcgan", "--width", "8", "--k", "3"])
    _, D = pgm_gan.build_gan(args, 3)
    assert all(conv.bias is not None for conv in D.convs)


def test_ema_step_copies_until_start_then_averages():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = common.EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.step(model, step=3, start=3)                      # step <= start: a copy
    assert torch.equal(ema.shadow.weight, model.weight)
    before = ema.shadow.weight.clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.step(model, step=4, start=3)                      # after start: 0.5 old + 0.5 new
    assert torch.allclose(ema.shadow.weight, 0.5 * before + 0.5 * model.weight)
