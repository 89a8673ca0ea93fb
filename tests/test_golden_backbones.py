"""BigGAN and StyleGAN2 against the authors' networks, number for number (issue 27).

tests/data/biggan_official.npz and stylegan2_official.npz hold small official networks (their state
dicts under the official names), fixed inputs and what the official code computed from them
(tests/data/README.md says how). Each test loads the official weights into our networks through
the name maps below and asks for the official outputs within TOL (absolute; the outputs reach
|7.1|). The largest differences measured (README, "Equivalence with the authors' code") are 4.8e-6
(StyleGAN2's image) and 2.5e-6 (BigGAN's G in training mode); float32 rounding, not a formula.
"""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import common

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TOL = 1e-5


def load(name):
    with np.load(os.path.join(DATA, name)) as f:
        data = {k: torch.from_numpy(f[k]) for k in f.files if k != "meta"}
        return data, json.loads(str(f["meta"]))


def fill(net, data, prefix, our_name):
    """Load every official `prefix.*` array into `net` under our_name(official key) -> (our key,
    transform) or None (no counterpart). Strict: each of our entries must be filled, except torch
    SN's `_v` (set by sync_sn) and BN's batch counter."""
    state, filled = net.state_dict(), set()
    for key, value in data.items():
        if key.startswith(prefix + "."):
            mapped = our_name(key[len(prefix) + 1:])
            if mapped is not None:
                name, transform = mapped
                assert state[name].shape == transform(value).shape, (key, name)
                state[name] = transform(value)
                filled.add(name)
    missing = [k for k in state if k not in filled and not k.endswith(("._v", "num_batches_tracked"))]
    assert not missing, missing
    net.load_state_dict(state)
    return net


def same(a):
    return a


# ------------------------------------------------------------------------------------------------
# BigGAN (ajbrock/BigGAN-PyTorch @ 98459431): G with G_shared, the shared embedding's output
# replaced by z (= our z-conditioned BN); D without its class projection.
# ------------------------------------------------------------------------------------------------

def biggan_name(key, net):
    module, leaf = key.rsplit(".", 1)
    if module in ("shared", "embed"):                       # class embeddings: unused here
        return None
    module = re.sub(r"^blocks\.(\d+)\.0\.", r"blocks.\1.", module).replace("conv_sc", "shortcut")
    module = {"output_layer.0": "bn", "output_layer.2": "to_img"}.get(module, module)
    if net == "D" and module == "linear":
        module = "head.shared"
    if leaf in ("stored_mean", "stored_var"):               # ccbn's stats live in our .bn
        stat = "running_mean" if leaf == "stored_mean" else "running_var"
        return (f"bn.{stat}" if module == "bn" else f"{module}.bn.{stat}"), same
    if module == "bn":                                      # the final BN's affine gain / bias
        return ("bn.weight" if leaf == "gain" else "bn.bias"), same
    if leaf == "weight":
        return f"{module}.parametrizations.weight.original", same
    if leaf == "u0":
        return f"{module}.parametrizations.weight.0._u", lambda a: a.reshape(-1)
    if leaf == "sv0":                                       # the official sigma: test_biggan_d
        return None
    return f"{module}.{leaf}", same                         # conv / linear bias


def sn_layers(net):
    for name, m in net.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            sn = m.parametrizations.weight[0]
            yield name, sn, m.parametrizations.weight.original.reshape(sn._u.numel(), -1)


@torch.no_grad()
def sync_sn(net, eval_mode):
    """The official SN step from u0: v = normalize(W^T u0), u = normalize(W v), sigma = u.(W v).
    Torch's training-mode SN takes that same step from _u = u0; in eval mode it takes none and
    uses the stored _u, _v, so those are set to the step's result."""
    for _, sn, W in sn_layers(net):
        v = F.normalize(W.t() @ sn._u, dim=0, eps=1e-8)
        sn._v.copy_(v)
        if eval_mode:
            sn._u.copy_(F.normalize(W @ v, dim=0, eps=1e-8))


def biggan(train=False):
    data, meta = load("biggan_official.npz")
    g, d = meta["G_kwargs"], meta["D_kwargs"]
    G = common.build_generator("biggan", g["dim_z"], g["resolution"], 3, width=g["G_ch"])
    D = common.build_discriminator("biggan", d["resolution"], 3, width=d["D_ch"], out_dim=d["output_dim"])
    for net, prefix in ((G, "G"), (D, "D")):
        fill(net, data, prefix, lambda k: biggan_name(k, prefix))
        sync_sn(net, eval_mode=not train)
        net.train(train)
    return G, D, data


def assert_close(ours, official):
    assert ours.shape == official.shape
    diff = (ours - official).abs().max().item()
    assert diff <= TOL, f"max |ours - official| = {diff:.3g}"


def test_biggan_g_eval_mode():
    """G(z) with BN running statistics. Catches: the z-conditioned BN's gain without its 1 +, a
    BN eps of 1e-4, bilinear instead of nearest upsampling."""
    G, _, data = biggan()
    with torch.no_grad():
        assert_close(G(data["z"]), data["G_out"])


def test_biggan_g_training_mode():
    """G(z) with BN batch statistics and one SN power-iteration step from u0, as BigGAN samples by
    default. Catches: BN that normalises with its running statistics in training mode."""
    G, _, data = biggan(train=True)
    with torch.no_grad():
        assert_close(G(data["z"]), data["G_out_train"])


def test_biggan_d_and_its_spectral_norms():
    """D(x) (no class projection) and each SN layer's sigma against the official sv0. Catches: the
    spatial sum taken as a mean, the ReLU before it left out, a ReLU on the raw image."""
    G, D, data = biggan()
    with torch.no_grad():
        assert_close(D(data["x"]), data["D_out"])
        for net, prefix in ((G, "G"), (D, "D")):
            for name, sn, W in sn_layers(net):
                official = re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.0.", name).replace("shortcut", "conv_sc")
                official = {"bn": "output_layer.0", "to_img": "output_layer.2",
                            "head.shared": "linear"}.get(official, official)
                sigma = torch.dot(sn._u, W @ sn._v)
                assert sigma.item() == pytest.approx(data[f"{prefix}.{official}.sv0"].item(), rel=1e-6), name


# ------------------------------------------------------------------------------------------------
# StyleGAN2 (NVlabs/stylegan2-ada-pytorch @ d72cc7d): 'skip' G, 'resnet' D, at 32 px
# ------------------------------------------------------------------------------------------------

_LAYER = {"weight": "conv.weight", "affine.weight": "conv.affine.weight", "affine.bias": "conv.affine.bias",
          "bias": "bias", "noise_const": "noise.noise_const", "noise_strength": "noise.strength"}


def stylegan2_name(key, net, img_size):
    if key.endswith("resample_filter"):                     # ours: non-persistent buffers
        return None
    if net == "D":
        r, layer, leaf = re.fullmatch(r"b(\d+)\.(\w+)\.(weight|bias)", key).groups()
        if layer == "fromrgb":
            return f"from_rgb.{leaf}", same
        if r == "4":                                        # the epilogue: conv, fc, out
            return f"{layer}.{leaf}", same
        return f"blocks.{int(math.log2(img_size // int(r)))}.{layer}.{leaf}", same
    m = re.fullmatch(r"mapping\.fc(\d+)\.(weight|bias)", key)
    if m:
        return f"mapping_net.layers.{m[1]}.{m[2]}", same
    if key in ("mapping.w_avg", "synthesis.b4.const"):
        return {"mapping.w_avg": "mapping_net.w_avg", "synthesis.b4.const": "const"}[key], same
    r, layer, leaf = re.fullmatch(r"synthesis\.b(\d+)\.(conv0|conv1|torgb)\.(.+)", key).groups()
    step = int(math.log2(int(r))) - 2                       # 0 at 4 px, 1 at 8 px, ...
    if layer == "torgb":
        return f"to_rgbs.{step}.{_LAYER[leaf]}", same
    index = 0 if step == 0 else 2 * step - (layer == "conv0")
    if layer == "conv0" and leaf == "weight":               # official: transposed conv; ours: correlation
        return f"convs.{index}.conv.weight", lambda a: a.flip([2, 3])
    return f"convs.{index}.{_LAYER[leaf]}", same


@pytest.fixture(scope="module")
def sg2():
    data, meta = load("stylegan2_official.npz")
    g, d = meta["G_kwargs"], meta["D_kwargs"]
    size = g["img_resolution"]
    G = common.StyleGAN2Generator(g["z_dim"], size, 3, w_dim=g["w_dim"], n_mapping=g["mapping_kwargs"]["num_layers"],
                                  channel_base=g["synthesis_kwargs"]["channel_base"],
                                  channel_max=g["synthesis_kwargs"]["channel_max"])
    D = common.StyleGAN2Discriminator(size, 3, channel_base=d["channel_base"], channel_max=d["channel_max"],
                                      mbstd_group=d["epilogue_kwargs"]["mbstd_group_size"])
    fill(G, data, "G", lambda k: stylegan2_name(k, "G", size))
    fill(D, data, "D", lambda k: stylegan2_name(k, "D", size))
    return G.eval(), D.eval(), data


def test_stylegan2_filters_are_the_official_ones(sg2):
    """Every official `resample_filter` buffer equals ours (not saved in our state dicts).
    Catches: the filter not normalised (or any other 4x4 kernel)."""
    G, D, data = sg2
    ours = [b for net in (G, D) for n, b in net.named_buffers() if n.endswith("resample_filter")]
    assert len(ours) == 4 + 6                               # G: 3 up convs + the skip's; D: 3 blocks x 2
    for key in (k for k in data if k.endswith("resample_filter")):
        assert torch.equal(ours[0], data[key]), key
    assert all(torch.equal(b, ours[0]) for b in ours)
    assert not any(k.endswith("resample_filter") for net in (G, D) for k in net.state_dict())


def test_stylegan2_up_layer(sg2):
    """The first up-sampling layer (transposed conv + filter), pinned in and out. Catches: the
    kernel not flipped, the filter's gain 4 left out, its padding off by one, bilinear upsampling."""
    G, _, data = sg2
    with torch.no_grad():
        out = G.convs[1](data["pin.G.b8.conv0.in"], data["ws"][:, 1], "const")
    assert_close(out, data["pin.G.b8.conv0.out"])


def test_stylegan2_skip_image_upsampling(sg2):
    """upfirdn2d.upsample2d of the 4x4 skip image. Catches: gain 1 instead of 4, the padding
    shifted by a pixel (2 / 1 swapped). (Bilinear in G's skip path: test_stylegan2_generator_image.)"""
    G, _, data = sg2
    assert_close(common.fir_upsample2d(data["pin.G.b8.img_in"], G.resample_filter), data["pin.G.b8.img_up"])


def test_stylegan2_d_block(sg2):
    """fromrgb + the first residual block (filter + stride-2 3x3 conv; filter + 1x1 stride-2 skip).
    Catches: 2x2 average pooling in either path, the filter's padding off by one."""
    _, D, data = sg2
    with torch.no_grad():
        out = D.blocks[0](common._lrelu(D.from_rgb(data["x"])))
    assert_close(out, data["pin.D.b32.out"])


def test_stylegan2_generator_image(sg2):
    """ws = mapping(z) and the image of the whole G (noise 'const'). Catches what the pins do, plus
    a bilinear skip path. Not the ws slicing: the stored ws repeat one w (no style mixing)."""
    G, _, data = sg2
    with torch.no_grad():
        assert_close(G.mapping(data["z"]), data["ws"])
        assert_close(G.synthesis(data["ws"], noise_mode="const"), data["G_img"])
        assert_close(G(data["z"], noise_mode="const"), data["G_img"])


@pytest.mark.parametrize("group", [4, 2])
def test_stylegan2_discriminator_logits(sg2, group):
    """D(x) with minibatch-std groups of 4 and of 2 (strided groups). Catches: the down paths, the
    minibatch std grouping contiguous samples."""
    _, D, data = sg2
    saved, D.mbstd.group_size = D.mbstd.group_size, group
    try:
        with torch.no_grad():
            out = D(data["x"])
    finally:
        D.mbstd.group_size = saved
    assert_close(out, data["D_logits" if group == 4 else "D_logits_mbstd_group2"])
