"""The official variants pinned to the authors' own numbers (tests/data/README.md says where they
come from). Each test feeds the stored float64 inputs to this project's functions and compares the
values and input gradients with what the authors' code computed: relative 1e-10 unless stated."""

import os

import numpy as np
import pytest
import torch

import maem_gan
import pgm_gan

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
RTOL = 1e-10


def load(name):
    with np.load(os.path.join(DATA, name)) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


@pytest.fixture(scope="module")
def maem():
    return load("maem_official.npz")


@pytest.fixture(scope="module")
def pgm():
    return load("pgm_official.npz")


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def grads(loss, inputs):
    """d loss / d input for each input, zeros where the input does not reach the loss."""
    out = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, out)]


def close(a, b, rtol=RTOL):
    assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=1e-300), (a, b)


# ---------------------------------------------------------------- MaEM-GAN, --variant official
def test_maem_maf_losses_of_d_and_g(maem):
    t_z, f_z = leaves(maem["t_z"], maem["f_z"])
    loss = maem_gan.maf_loss_d(t_z, f_z)
    close(loss, maem["maf_d"])
    g_t, g_f = grads(loss, [t_z, f_z])
    close(g_t, maem["maf_d_grad_t_z"]), close(g_f, maem["maf_d_grad_f_z"])
    f_z, = leaves(maem["f_z"])
    loss = maem_gan.maf_loss_g(f_z)
    close(loss, maem["maf_g"])
    close(grads(loss, [f_z])[0], maem["maf_g_grad_f_z"])


def test_maem_dlle_loss_and_its_stop_gradient(maem):
    t_z, t_aug, f_z, f_aug = leaves(maem["t_z"], maem["t_z_aug"], maem["f_z"], maem["f_z_aug"])
    loss = maem_gan.dlle_loss(t_z, t_aug, "official") + maem_gan.dlle_loss(f_z, f_aug, "official")
    close(loss, maem["dlle"])
    for g, key in zip(grads(loss, [t_z, t_aug, f_z, f_aug]), ("t_z", "t_z_aug", "f_z", "f_z_aug")):
        close(g, maem["dlle_grad_" + key])
    assert maem["dlle_grad_t_z_aug"].abs().max() == 0            # the stored aug gradients are zero


def test_maem_flip_noise_transform(maem):
    args = maem_gan.parse_args(["--dataset", "cifar10", "--variant", "official"])
    x, eps = maem["img_real"], maem["aug_noise"]
    close(maem_gan.dlle_transform(x, args, flip_dim=2, eps=eps), maem["aug_flip_h"])
    close(maem_gan.dlle_transform(x, args, flip_dim=3, eps=eps), maem["aug_flip_w"])


def test_maem_disomap_mix_and_loss_with_normal_a(maem):
    a = maem["alpha"]
    mix, a_out = maem_gan.isomap_mix(maem["img_real"], maem["img_fake"], "official", a=a)
    close(mix, maem["iso_mix_input"])
    assert a_out is a
    mix_code, t_z, f_z = leaves(maem["mix_code"], maem["t_z"], maem["f_z"])
    loss = maem_gan.isomap_loss(mix_code, t_z, f_z, a, "official", noise=maem["iso_noise"])
    close(loss, maem["iso"])
    for g, key in zip(grads(loss, [mix_code, t_z, f_z]), ("mix_code", "t_z", "f_z")):
        close(g, maem["iso_grad_" + key])


def test_maem_entropy_warmup_of_the_shipped_official_cifar10(maem):
    args = maem_gan.parse_args(["--dataset", "cifar10", "--variant", "official"])
    got = torch.tensor([maem_gan.entropy_weight(args, int(e)) for e in maem["epochs"]], dtype=torch.float64)
    close(got, maem["entropy_weight_at_epochs"], rtol=1e-15)


def test_maem_authors_buffer_along_the_stored_stream(maem):
    stream = maem["buffer_stream"]                               # (8 batches, B, m)
    batch, m = stream.shape[1:]
    buf = maem_gan.AuthorsReplayBuffer(len(maem["buffer_init"]), batch, m, "cpu")
    buf.data = maem["buffer_init"].unsqueeze(1).repeat(1, batch, 1)          # their U(-1, 1) draw
    for i, codes in enumerate(stream):
        v, = leaves(codes)
        loss = maem_gan.entropy_loss(v, buf, variant="official")
        close(loss, maem["buffer_loss"][i])
        close(grads(loss, [v])[0], maem["buffer_loss_grad"][i])
        buf.push(v)
        assert len(buf) == int(maem["buffer_slots_after"][i])
    assert [maem_gan.AuthorsReplayBuffer.slots_after(32, batch, n) for n in range(1, 9)] == \
        maem["buffer_slots_after"].tolist()


# ---------------------------------------------------------------- PGMGAN
def test_pgm_guide_mean_and_sum(pgm):
    logits, y = pgm["logits"], pgm["y"]
    close(pgm_gan.guide(logits, y, "mean"), pgm["guide_mean_per_sample"])
    close(pgm_gan.guide(logits, y, "sum"), pgm["guide_sum_per_sample"])       # paper Eq. 6
    x, = leaves(logits)
    loss = pgm_gan.guide(x, y, "mean").mean()
    close(loss, pgm["guide_mean"])
    close(grads(loss, [x])[0], pgm["guide_mean_grad_logits"])


def test_pgm_guided_g_loss_of_the_shipped_cifar10_preset(pgm):
    args = pgm_gan.parse_args(["--dataset", "cifar10", "--k", str(pgm["logits"].shape[1])])
    d_fake = pgm["d_fake"].squeeze(1)
    for step, lam_ref, loss_ref in zip(pgm["g_steps"], pgm["cifar10_guide_weight"],
                                       pgm["cifar10_guided_g_loss_hinge"]):
        lam = pgm_gan.guide_weight(args, int(step))
        assert lam == pytest.approx(float(lam_ref), rel=RTOL, abs=1e-15)
        total, _, _ = pgm_gan.guided_g_loss(d_fake, pgm["logits"], pgm["y"], lam, args)
        close(total, loss_ref)


@pytest.mark.parametrize("kind", ["hinge", "standard"])
def test_pgm_d_losses(pgm, kind):
    real, fake = leaves(pgm["d_real"].squeeze(1), pgm["d_fake"].squeeze(1))
    loss = pgm_gan.d_loss_fn(real, fake, kind)
    close(loss, pgm[f"d_loss_{kind}"])
    g_real, g_fake = grads(loss, [real, fake])
    close(g_real, pgm[f"d_loss_{kind}_grad_real"].squeeze(1))
    close(g_fake, pgm[f"d_loss_{kind}_grad_fake"].squeeze(1))


def test_pgm_scan_loss_is_eq5_with_the_presets_weights(pgm):
    args = pgm_gan.parse_args(["--dataset", "cifar10"])
    anchors, nbrs = leaves(pgm["scan_anchors"], pgm["scan_neighbors"])
    loss, terms = pgm_gan.partition_loss(anchors.softmax(1), nbrs.softmax(1), args.alpha, args.beta)
    close(loss, pgm["scan_total"])
    close(terms["consistency"], pgm["scan_consistency"])
    close(terms["balance"], pgm["scan_entropy"])
    g_a, g_n = grads(loss, [anchors, nbrs])
    close(g_a, pgm["scan_total_grad_anchors"]), close(g_n, pgm["scan_total_grad_neighbors"])
