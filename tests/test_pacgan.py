"""The `pacgan` architecture: PacGAN's stacked-MNIST G and its reduced D (the CPU stacked benchmark).

Checked against what PacGAN's TensorFlow model.py defines: the parameter counts of its printout,
TensorFlow's 'SAME' padding (an extra pixel goes after), its transposed conv as the gradient of
that conv, and the DCGAN-TensorFlow initialisation.
"""

import pytest
import torch
import torch.nn.functional as F

import common


def test_parameter_counts_of_the_published_networks():
    # PacGAN (D=0.25G / D=0.5G): G 287,875; D 585 at 1/4 and 1,889 at 1/2 (the counts,
    # which equal the sum over model.py's layers by hand: 256*1024+1024 + 2*64 + ... + 8*3*9+3).
    assert common.count_params(common.build_generator("pacgan", 256, 28, 3)) == 287_875
    assert common.count_params(common.build_discriminator("pacgan", 28, 3, width=2)) == 585
    assert common.count_params(common.build_discriminator("pacgan", 28, 3, width=4)) == 1_889


@pytest.mark.parametrize("size,stride,pads", [(28, 2, (0, 1)), (14, 2, (0, 1)), (7, 2, (1, 1)),
                                              (28, 1, (1, 1)), (4, 2, (0, 1))])
def test_tf_same_padding_by_hand(size, stride, pads):
    # out = ceil(size / stride); total = (out - 1) * stride + 3 - size; the odd pixel after.
    assert common._tf_same_pads(size, stride) == pads


def _reference_d(D, x):
    """D's forward written out with TensorFlow's explicit pads (BN on batch statistics)."""
    h = x
    for conv, bn, pads in zip(D.convs, D.norms, [(0, 1), (0, 1), (1, 1)]):
        h = F.conv2d(F.pad(h, (pads[0], pads[1], pads[0], pads[1])), conv.weight, conv.bias, stride=2)
        h = F.batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=1e-5)
        h = F.leaky_relu(h, 0.3)
    assert h.shape[-2:] == (4, 4)
    return D.head.shared(h.flatten(1))


def test_discriminator_equals_its_written_out_tf_forward():
    torch.manual_seed(0)
    D = common.build_discriminator("pacgan", 28, 3, width=4)
    with torch.no_grad():                       # move BN off 1 / 0 so gain and bias are checked too
        for bn in D.norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.rand(6, 3, 28, 28) * 2 - 1
    assert torch.allclose(D(x), _reference_d(D, x), atol=1e-6)


def _transposed_same(h, weight, bias, size):
    """TensorFlow's conv2d_transpose (model.py's deconv2d) to `size` pixels: the gradient of a
    stride-2 'SAME' conv from `size` pixels down to h's, with the same kernel, plus the bias."""
    before, after = common._tf_same_pads(size, 2)
    x = torch.zeros(h.shape[0], weight.shape[1], size, size, requires_grad=True)
    y = F.conv2d(F.pad(x, (before, after, before, after)), weight, stride=2)
    (grad,) = torch.autograd.grad(y, x, grad_outputs=h)
    return grad + bias[None, :, None, None]


def test_generator_equals_its_written_out_tf_forward():
    torch.manual_seed(0)
    G = common.build_generator("pacgan", 16, 28, 3, width=2)
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.uniform_(-0.1, 0.1)
    z = torch.randn(5, 16)

    def bn(h, norm):
        return F.batch_norm(h, None, None, norm.bn.weight, norm.bn.bias, training=True, eps=1e-5)

    h = F.relu(bn(F.linear(z, G.fc.weight, G.fc.bias).view(5, 16, 4, 4), G.norms[0]))
    for deconv, norm, size in zip(G.deconvs, G.norms[1:], (7, 14, 28)):
        h = F.relu(bn(_transposed_same(h.detach(), deconv.weight, deconv.bias, size), norm))
    ref = torch.tanh(F.conv2d(h, G.to_img.weight, G.to_img.bias, padding=1))
    assert torch.allclose(G(z), ref, atol=1e-5)


def test_generator_runs_and_its_sampler_layout():
    torch.manual_seed(0)
    G = common.build_generator("pacgan", 256, 28, 3)
    x = G(torch.randn(5, 256))
    assert x.shape == (5, 3, 28, 28) and x.abs().max() <= 1
    assert [d.out_channels for d in G.deconvs] == [32, 16, 8] and G.fc.out_features == 64 * 16
    D = common.build_discriminator("pacgan", 28, 3, width=2)
    assert [c.out_channels for c in D.convs] == [2, 4, 8] and D.head.shared.in_features == 128


def test_initialisation_is_dcgan_tensorflow():
    # N(0, 0.02) weights (convs truncated at 2 std), zero biases, BN gain 1 and bias 0.
    torch.manual_seed(0)
    G = common.build_generator("pacgan", 256, 28, 3)
    D = common.build_discriminator("pacgan", 28, 3, width=4)
    assert abs(G.fc.weight.std().item() - 0.02) < 0.001
    for conv in list(D.convs) + [G.to_img]:
        assert conv.weight.abs().max() <= 0.04 and conv.weight.std() > 0.012
        assert torch.all(conv.bias == 0)
    for layer in (G.fc, *G.deconvs, D.head.shared):
        assert torch.all(layer.bias == 0)
        assert 0.01 < layer.weight.std().item() < 0.03
    for bn in D.norms:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_heads_for_the_methods():
    # MaEM-GAN's m-dim code and PGMGAN's per-partition outputs and conditional G.
    torch.manual_seed(0)
    D = common.build_discriminator("pacgan", 28, 3, width=2, out_dim=16)
    assert D(torch.randn(4, 3, 28, 28)).shape == (4, 16)
    Dk = common.build_discriminator("pacgan", 28, 3, width=2, out_dim=1, n_classes=7)
    x = torch.randn(4, 3, 28, 28)
    y = torch.tensor([0, 6, 2, 6])
    assert Dk(x).shape == (4, 7, 1)
    assert torch.allclose(Dk(x, y), Dk(x)[torch.arange(4), y])
    G = common.build_generator("pacgan", 8, 28, 3, width=2, n_classes=5).eval()
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, common.CondBatchNorm2d):
                m.gain.weight.uniform_(0.5, 1.5)
                m.bias.weight.uniform_(-0.5, 0.5)
    z = torch.randn(1, 8).repeat(4, 1)
    out = G(z, torch.tensor([0, 3, 0, 3]))
    assert torch.allclose(out[0], out[2]) and (out[0] - out[1]).abs().max() > 1e-3


def test_only_28_pixels():
    with pytest.raises(common.UsageError):
        common.build_generator("pacgan", 256, 32, 3)
    with pytest.raises(common.UsageError):
        common.build_discriminator("pacgan", 32, 3)
