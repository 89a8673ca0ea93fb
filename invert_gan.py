"""InvertGAN: Reducing Mode Collapse with Multi-dimensional Gaussian Inversion.

Paper: "InvertGAN: Reducing Mode Collapse with Multi-dimensional Gaussian Inversion" (anonymous
submission under double-blind review). The authors released no code; every value the paper
leaves out is marked below as "ours".

The idea in three lines:
  * Train an inverse network F: x -> z beside the GAN's G: z -> x, with a consistency loss that
    makes F = G^-1 (Eq. 5): then every real x has a latent code z~ = F(x) with G(z~) = x.
  * If G is mode complete (Def. 1), the codes F(x_i) of independent real samples are independent
    samples of P_z = N(0, I_l) (Prop. 1) ...
  * ... so push the batch of codes F(x) towards N(0, I) with a *multi-dimensional* Gaussian loss
    on their mean and full covariance (Eq. 6-9), not only their per-dimension variance (Eq. 11).

Launch:
    python invert_gan.py --dataset ring                       # 2-D quick start (CPU, ~4 min)
    python invert_gan.py --dataset cifar10 --data-root data/cifar10 --download   # one GPU
    torchrun --standalone --nproc_per_node=8 invert_gan.py --dataset stl10       # one node
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 invert_gan.py --dataset cifar100              # two nodes
    python invert_gan.py --dataset ring --out runs/x --resume                    # continue a run
    python evaluate.py ckpt runs/invert_gan-ring-0/ckpt.pt --n 50000             # evaluate
Under torchrun --batch-size is the global batch, and mu and Sigma of F(x) are those of the global
batch (batch_gaussian): N processes train the objective of one process with the same batch.

Map of the paper to this file:
    Eq. 4   GAN objective V(G, D)                -> gan_loss_d / gan_loss_g
    Eq. 5   consistency loss L_cons              -> consistency_loss
    Eq. 6   W2 between MD Gaussians              -> gaussian_loss("w2")
    Eq. 7   KL(P_z || P_z~)                      -> gaussian_loss("kl")
    Eq. 8-9 p-norm distance                      -> gaussian_loss("pnorm")
    Eq. 10  min_{G,F} max_D V + L_cons + L_Gau   -> train() (the loop), d_step (D), gf_losses (G and F)
    Eq. 11  1-D Gaussian loss (baseline)         -> gaussian_loss("w2-1d")
    Eq. 12-13 z~-discriminator D_z (App. A.1)    -> dz_step / gf_losses, --gauss-loss zdisc
    Table 1 modes / quality / reverse KL         -> evaluate_points (reverse_kl_hq: Sec. 5.1's form)
            quality: within 3 std of our mode std (0.01 ring, 0.05 grid; Sec. 5.1: 0.001 / 0.0025), so a
            tolerance 10x (ring) / 20x (grid) looser than the paper's, on data as much wider (--data-std)
    Fig. 3  inverse, latent, samples, mode share -> figure3
    App. A.2 Tables 3-4 (F and G for images)     -> common.ResNetEncoder / common.InvertResNetGenerator
"""

import argparse
import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F_nn

import common

METHOD = "invert_gan"

# ==================================================================================================
# 1. Arguments and per-dataset presets
# ==================================================================================================

# Flags that default to None are filled from PRESETS[dataset] unless given on the command line.
# Where the paper states a value we cite it; "ours" marks a value the paper does not give (the
# authors released no code).
_TOY = dict(
    # Sec. 5.1: batch 128, four linear layers with ReLU; the latent space is 2-D (Fig. 3 plots
    # z~ = F(x) in the plane). Width 128: ours.
    arch="mlp", z_dim=2, batch_size=128, width=128,
    # Ours: Adam 1e-3, one D step per G/F step, constant for the first half, then linear decay to
    # 0 (lr_decay_from 0.5). The decay is what brings the samples' spread down to the data's 0.01 /
    # 0.05: with a constant lr, G keeps oscillating around the modes and only ~78-92% of samples
    # are within 3 std (1 seed each on ring / grid; README "Choosing the 2-D training schedule").
    lr=1e-3, beta1=0.5, beta2=0.999, lr_decay_from=0.5, n_dis=1,
    # Ours: no weight averaging (sample the trained G itself, as the paper does); logging.
    ema=0.0, ema_start=0, log_every=500, sample_every=4000, ckpt_every=4000)
_IMAGES = dict(
    # Sec. 5.2 / App. A.2: 100K steps of batch 64, ResNet G (InvertGAN Table 4) and F (InvertGAN Table 3,
    # whose last layer is Linear 20: the latent dimension l = 20); base channels 64 (InvertGAN Tables 3-4).
    arch="invert-resnet", z_dim=20, batch_size=64, steps=100_000, width=64,
    # Ours: the image D (the appendix gives none: SNGAN's ResNet D, see build_networks) and the
    # optimiser settings (the paper gives none): Adam 2e-4 (0.5, 0.999), constant, one D step per
    # G/F step; no weight averaging; logging.
    lr=2e-4, beta1=0.5, beta2=0.999, lr_decay_from=1.0, n_dis=1, ema=0.0, ema_start=0,
    log_every=200, sample_every=5000, ckpt_every=5000)
_PACGAN = dict(
    # PacGAN's stacked-MNIST protocol (tests/bench_pacgan.py), fjxmlzn/PacGAN D=0.25G config.py:
    # batch 128, z 256, Adam betas (0.5, 0.99), lr 1e-4 for G (and F, trained with G, Eq. 10) and
    # 2e-4 for D (and D_z), 500K iterations, 25,600 counted samples. model.py: G and D (common.
    # PacGANGenerator / PacGANDiscriminator, D width 2 = 1/4 of G; BN in D, no spectral norm), BCE
    # with the non-saturating G loss (PacGAN's model.py; ours for InvertGAN, whose Eq. 4 is the minimax
    # form: gan_loss_g), one D step per G step (n_dis 1, also ours for InvertGAN), a constant lr. Data
    # drawn afresh (redraw, common.StackedDataset).
    # Ours: F sized like G (common.PacGANEncoder); InvertGAN's L_cons / L_Gau unchanged; a fresh z
    # for the G/F step (PacGAN reuses the D step's z: same distribution); no EMA; logging.
    arch="pacgan", img_size=28, z_dim=256, batch_size=128, steps=500_000, width=8, d_width=2,
    lr=1e-4, lr_d=2e-4, beta1=0.5, beta2=0.99, lr_decay_from=1.0, n_dis=1, ema=0.0, ema_start=0,
    redraw=True, eval_samples=25_600, log_every=500, sample_every=5000, ckpt_every=5000)
PRESETS = {
    # The PacGAN Table 3 benchmark on the stacked datasets (_PACGAN): keyed (dataset, arch).
    ("stacked-mnist", "pacgan"): _PACGAN,
    ("stacked-fashion-mnist", "pacgan"): _PACGAN,
    # Sec. 5.1: Fig. 3 after 24K mini-batches; 50K test samples.
    "ring": dict(_TOY, steps=24_000, eval_samples=50_000),
    # Ours: 48K steps (the paper gives 24K only for the ring's Fig. 3, and trains the grid of
    # Fig. 5 for "enough" steps). At 24K some grid modes keep a sliver of P_z: 5 seeds gave 94.4 %
    # quality and reverse KL 0.34; 48K gave 97.1 % and 0.16 (README, InvertGAN Table 1).
    # Sec. 5.1: 100K test samples.
    "grid": dict(_TOY, steps=48_000, eval_samples=100_000),
    # Sec. 5.2: IS/FID/MS on 10K samples (5K for STL-10).
    "cifar10": dict(_IMAGES, eval_samples=10_000),
    "cifar100": dict(_IMAGES, eval_samples=10_000),
    # STL-10 (ours): 48x48, the usual GAN resolution for it (the paper gives none; its tables are
    # 32x32), on train+unlabeled (105K images, the usual GAN training split; the paper does not
    # say which split): see common.DATASETS.
    "stl10": dict(_IMAGES, eval_samples=5_000),
}
# Where each preset comes from, for --help.
PRESET_SOURCES = {
    "ring": "Sec. 5.1 (batch 128, 4-layer MLPs, latent 2, 24K steps as Fig. 3; optimiser and lr decay ours)",
    "grid": "Sec. 5.1 (batch 128, 4-layer MLPs, latent 2; 48K steps, optimiser and lr decay ours)",
    "cifar10": "Sec. 5.2 / App. A.2 (batch 64, 100K steps, latent 20; D and optimiser ours)",
    "cifar100": "Sec. 5.2 / App. A.2 (batch 64, 100K steps, latent 20; D and optimiser ours)",
    "stl10": "Sec. 5.2 / App. A.2 (batch 64, 100K steps, latent 20; 48x48, D and optimiser ours)",
    ("stacked-mnist", "pacgan"): "PacGAN D=0.25G config.py / model.py (batch 128, z 256, lr G 1e-4 D 2e-4, "
                                 "betas 0.5/0.99, BCE, 1 D step); F sized like G, ours",
    ("stacked-fashion-mnist", "pacgan"): "as stacked-mnist --arch pacgan (PacGAN's protocol on Fashion-MNIST, ours)",
}
GAUSS_LOSSES = ("pnorm", "w2", "kl", "w2-1d", "zdisc", "none")
POINT_DATASETS = ("ring", "grid")


def preset_for(args):
    """PRESETS[(dataset, arch)] for --arch pacgan, else PRESETS[dataset]; one line if there is none."""
    key = (args.dataset, args.arch) if args.arch == "pacgan" else args.dataset
    if args.arch == "pacgan":
        common.check_pacgan(args.dataset, args.img_size or 28)
    if key not in PRESETS:
        raise common.UsageError(f"--dataset {args.dataset} needs --arch pacgan (PacGAN's stacked protocol)")
    return PRESETS[key]


def parse_args(argv=None):
    p = common.ArgParser(description=__doc__.split("\n\n")[0] + "\n\nFlags left unset take the "
                         "dataset's preset, listed at the end.", formatter_class=common.PresetHelpFormatter,
                         epilog=common.presets_epilog(PRESETS, PRESET_SOURCES))
    p.add_argument("--dataset", required=True, choices=sorted({k if isinstance(k, str) else k[0] for k in PRESETS}),
                   help="ring/grid (Sec. 5.1), cifar10/cifar100/stl10 (Sec. 5.2), stacked-(fashion-)mnist "
                        "with --arch pacgan (the PacGAN Table 3 protocol, ours)")
    p.add_argument("--steps", type=int, default=None, help="G updates (24K on the ring, Fig. 3; 48K on the grid, ours; 100K on images, Sec. 5.2)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (128 on 2-D, Sec. 5.1; 64 on images, Sec. 5.2)")
    p.add_argument("--z-dim", type=int, default=None,
                   help="latent dimension l (2 on 2-D; 20 on images, InvertGAN Table 3)")
    p.add_argument("--arch", default=None, choices=["mlp", "invert-resnet", "pacgan"],
                   help="networks (mlp: 4 linear+ReLU; invert-resnet: App. A.2; pacgan: PacGAN's stacked-MNIST "
                        "G and reduced D, with F sized like G (common.PacGANEncoder: G's layers reversed, no BN; "
                        "ours, as InvertGAN Table 3's F mirrors its Table 4's G) and D_z as for images)")
    common.add_pacgan_args(p)
    p.add_argument("--width", type=int, default=None,
                   help="hidden units of the MLPs G, F, D, D_z (ours: 128) / base channels of the image "
                        "G, F (64, InvertGAN Tables 3-4) and D (ours: 64)")
    p.add_argument("--img-size", type=int, default=None, help="image resolution (default: the dataset's, 48 for STL-10)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate for G and F (and D, D_z without --lr-d; ours)")
    p.add_argument("--lr-d", type=float, default=None,
                   help="Adam learning rate for D and D_z (default: --lr; pacgan preset: 2e-4, PacGAN config.py)")
    p.add_argument("--beta1", type=float, default=None, help="Adam beta1 (ours)")
    p.add_argument("--beta2", type=float, default=None, help="Adam beta2 (ours)")
    p.add_argument("--n-dis", type=int, default=None,
                   help="D updates (and D_z updates with zdisc) per G/F update (ours: 1)")
    p.add_argument("--lr-decay-from", type=float, default=None,
                   help="fraction of --steps after which every lr decays linearly to 0 (ours; 1 = constant "
                        "lr). The schedule follows --steps: keep --steps when resuming a decaying run")
    p.add_argument("--ema", type=float, default=None,
                   help="decay of an exponential moving average of G's weights, used for samples and "
                        "metrics (ours; 0 = off, sample the trained G as the paper does)")
    p.add_argument("--ema-start", type=int, default=None, help="G step at which the EMA starts as a copy of G")
    p.add_argument("--gauss-loss", default="pnorm", choices=GAUSS_LOSSES,
                   help="L_Gau on F(x): pnorm Eq. 9 (the paper's choice, Sec. 5.1), w2 Eq. 6, kl Eq. 7, "
                        "w2-1d Eq. 11 (1-D baseline), zdisc App. A.1, none")
    p.add_argument("--p", "--p-norm", dest="p", type=float, default=2.0,
                   help="p of the p-norm distance (Eq. 8-9; not stated in the paper, ours: 2); under torchrun "
                        "write --p-norm (torchrun's own parser rejects --p as an ambiguous abbreviation)")
    p.add_argument("--lambda-cons", type=float, default=1.0, help="weight of L_cons (Eq. 10: 1); 0 with --gauss-loss none = plain GAN")
    p.add_argument("--lambda-gauss", type=float, default=1.0, help="weight of L_Gau (Eq. 10: 1)")
    p.add_argument("--eig-eps", type=float, default=1e-6,
                   help="w2, kl and w2-1d use Sigma + eps I (eigenvalues lambda + eps), so that a singular "
                        "batch covariance has finite values and gradients (ours)")
    p.add_argument("--prior-samples", type=int, default=1024,
                   help="samples of P_z per D_z update with zdisc, global like --batch-size (Sec. 4.2(4): "
                        "'as many as possible'; ours: 1024)")
    common.add_eval_args(p, "samples for metrics.json (50K ring, 100K grid, Sec. 5.1; 10K/5K images, Sec. 5.2)",
                         data_std_help="std of each 2-D mode (default 0.01 ring, 0.05 grid: the literature's, ours; "
                                       "Sec. 5.1 says 0.001 / 0.0025: see common.SYNTHETIC_STD)")
    common.add_runtime_args(p)
    args = p.parse_args(argv)
    common.apply_presets(args, preset_for(args), METHOD)
    if args.img_size is None:
        args.img_size = 1 if args.arch == "mlp" else common.DATASETS[args.dataset]["img_size"]
    points = args.dataset in POINT_DATASETS
    if points != (args.arch == "mlp"):
        # The MLPs are the 2-D networks of Sec. 5.1, the ResNets those of App. A.2 for images: an MLP on
        # cifar10 would silently train on 1x1 images, a ResNet cannot read 2-D points.
        raise common.UsageError(f"--arch {args.arch} does not fit --dataset {args.dataset}: use --arch "
                                f"{'mlp' if points else 'invert-resnet'}")
    common.check_flags(args, positive=("z_dim", "n_dis", "width", "img_size", "eval_samples", "lr",
                                       "lr_d", "prior_samples", "d_width"),
                       nonnegative=("beta1", "beta2", "lambda_cons", "lambda_gauss", "eig_eps",
                                    "ema", "ema_start"))
    common.check_shared_flags(args)
    if not args.p >= 1 or not math.isfinite(args.p):
        raise common.UsageError("--p must be a finite number >= 1 (the p-norm of Eq. 8)")
    return args


# ==================================================================================================
# 2. The GAN objective (Eq. 4)
# ==================================================================================================

def gan_loss_d(d_real, d_fake):
    """max_D E log D(x) + E log(1 - D(G(z)))  ==  min_D BCE(D(x), 1) + BCE(D(G(z)), 0).

    D outputs logits; sigmoid is folded into the numerically stable BCE-with-logits.
    """
    return (F_nn.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F_nn.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))


def gan_loss_g(d_fake):
    """G's side of Eq. 4 in the usual non-saturating form (ours; Eq. 4 is the minimax form):
    min_G -E log D(G(z)).

    (min_G E log(1 - D(G(z))) has vanishing gradients when D wins early; Goodfellow et al. 2014.)
    """
    return F_nn.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


# ==================================================================================================
# 3. The consistency loss (Eq. 5)
# ==================================================================================================

def consistency_loss(z, z_rec, x, x_rec):
    """L_cons = E ||z - F(G(z))||_2 + E ||x - G(F(x))||_2  (Eq. 5).

    The first term makes F invert G on generated data; the second makes every real x reachable:
    G(F(x)) = x, i.e. x has a code in R^l (against mode missing). Norms are plain (not squared)
    L2 norms of each sample, averaged over the batch, as written in Eq. 5.
    """
    return ((z - z_rec).flatten(1).norm(dim=1).mean()
            + (x - x_rec).flatten(1).norm(dim=1).mean())


# ==================================================================================================
# 4. The multi-dimensional Gaussian losses on z~ = F(x) (Eq. 6-9, 11)
# ==================================================================================================
# Sec. 4.2: the batch of codes z~_i = F(x_i) is summarised by its mean mu and covariance Sigma
# (batch estimates), and a distance between N(mu, Sigma) and P_z = N(0, I_l) is minimised.

def batch_gaussian(codes):
    """Mean (l,) and unbiased covariance (l, l; ours: Sec. 4.2 names no estimator, B - 1 is the usual
    sample covariance) of the codes (B, l) of the *whole* batch, float64.
    float64 keeps the rounding error of a near-singular Sigma far below the floor eps of the losses.
    """
    z = codes.double()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # torchrun: the global batch's codes, gradients back to each rank's own (why, and why the
        # gradient scale is right under DDP: common.all_gather_grad, section 1 "Runtime").
        z = common.all_gather_grad(z)                        # (B_global, l)
    mu = z.mean(0)
    centred = z - mu
    sigma = centred.T @ centred / (z.shape[0] - 1)
    return mu, sigma


def gaussian_loss(kind, mu, sigma, p=2.0, eps=1e-6):
    """Distance between N(mu, Sigma) and N(0, I) for `kind` in pnorm | w2 | kl | w2-1d.

    w2 and kl read Eq. 6-7 in the eigenvalues lambda_i of Sigma (Sigma = V diag(lambda) V^T, so
    Sigma^(1/2) = V diag(sqrt(lambda)) V^T, and traces and determinants do not depend on V):
        tr(Sigma + I - 2 Sigma^(1/2)) = sum_i (lambda_i + 1 - 2 sqrt(lambda_i)) = sum_i (sqrt(lambda_i) - 1)^2
        log det Sigma = sum_i log lambda_i,      tr(Sigma^-1) = sum_i 1 / lambda_i.
    w2, kl and w2-1d see Sigma + eps I (ours): eigenvalues lambda + eps, the same regulariser
    in every term of a loss. Unlike a clamp at eps, it keeps the gradient of a collapsed direction
    (lambda ~ 0), the very direction these losses exist to re-inflate. Traces and determinants go
    through `eigvalsh`, whose backward (V diag(dL/dlambda) V^T) stays finite for repeated
    eigenvalues, unlike the eigenvector backward of `eigh`. Norms use torch.linalg.vector_norm,
    whose gradient at exactly 0 is 0 (a subgradient at the minimum), not NaN.
    """
    l = mu.shape[0]
    eye = torch.eye(l, device=mu.device, dtype=mu.dtype)
    if kind == "pnorm":
        # Eq. 9: D^p = ||mu||_p + ||Sigma - I||_p, with the entry-wise matrix norm of Eq. 8,
        # (sum_ij |S_ij|^p)^(1/p). The paper writes S_ij^p; we take absolute values so that odd
        # and fractional p give a norm (for even p the two agree). No regulariser is needed.
        return _norm(mu, p) + _norm(sigma - eye, p)
    if kind == "w2-1d":
        # Eq. 11: W2 between the 1-D marginals: sqrt(||mu||^2 + ||sigma - 1||^2), sigma = per-dim std.
        std = torch.sqrt(torch.diagonal(sigma) + eps)
        return _norm(torch.cat([mu, std - 1]), 2)
    evals = torch.linalg.eigvalsh(0.5 * (sigma + sigma.T)) + eps        # (l,) of Sigma + eps I
    if kind == "w2":
        # Eq. 6: W2 = sqrt(||mu||^2 + tr(Sigma + I - 2 Sigma^(1/2))); with the trace identity above,
        # W2 is the 2-norm of (mu, sqrt(lambda) - 1).
        return _norm(torch.cat([mu, evals.sqrt() - 1]), 2)
    if kind == "kl":
        # Eq. 7: KL(P_z || P_z~) = 1/2 {log det Sigma - l + tr(Sigma^-1) + mu^T Sigma^-1 mu}.
        # The quadratic form is a linear solve with the same Sigma + eps I (a stable substitute
        # for V diag(1/lambda) V^T, whose eigenvector backward blows up for near-equal eigenvalues).
        quad = mu @ torch.linalg.solve(sigma + eps * eye, mu)
        return 0.5 * (evals.log().sum() - l + (1.0 / evals).sum() + quad)
    raise ValueError(f"unknown Gaussian loss {kind!r}")


def _norm(t, p):
    return torch.linalg.vector_norm(t.flatten(), ord=p)


# ==================================================================================================
# 5. Networks
# ==================================================================================================

def build_networks(args, channels):
    """G: z -> x, D: x -> logit, F: x -> z (the inverse), and D_z: z -> logit for zdisc.

    2-D data: four linear layers with ReLU for each (Sec. 5.1); hidden width ours (128).
    Images: InvertGAN Table 4 G and Table 3 F (App. A.2). Their ResnetBlock internals are ours, as the
    tables give only kernels and widths: LeakyReLU 0.2 before each conv, no normalisation, residual
    scaled by 0.1 (Mescheder et al.'s GAN_stability, whose blocks the tables match; see
    common.InvertResBlock). The image D is ours: the appendix gives none, so SNGAN's ResNet D
    (spectral norm), with --width base channels. D_z (App. A.1 gives no architecture, ours): a
    4-layer ReLU MLP on the codes, as wide as the 2-D networks, 128 units for images.
    --arch pacgan: PacGAN's G and reduced D, F sized like G (common.PacGANEncoder, ours).
    """
    size = args.img_size
    G = common.build_generator(args.arch, args.z_dim, size, channels, width=args.width)
    if args.arch == "pacgan":     # PacGAN's reduced D (BN, no spectral norm) at --d-width
        D = common.build_discriminator("pacgan", size, channels, width=args.d_width)
    else:
        D = common.build_discriminator(args.arch if args.arch == "mlp" else "resnet", size, channels,
                                       width=args.width)
    F = common.build_encoder(args.arch, size, channels, args.z_dim, width=args.width)
    Dz = (common.MLP(args.z_dim, 1, hidden=args.width if args.arch == "mlp" else 128)
          if args.gauss_loss == "zdisc" else None)
    return G, D, F, Dz


# ==================================================================================================
# 6. Evaluation and pictures (Table 1, Figure 3)
# ==================================================================================================

def evaluate_points(G, args, device):
    """Table 1 metrics: modes covered (one high-quality sample covers a mode: ours, the paper gives no
    count; as the 2-D code of Self-Conditioned GAN / PGMGAN), high-quality fraction (within 3 std),
    reverse KL in the standard form (all samples) and in the paper's (reverse_kl_hq: high-quality
    samples only), with common.mode_metrics_2d's within-mode figures (common.run_points_metrics)."""
    def draw(n):
        return common.generate(G, n, args.z_dim, device, batch=10_000, z_device=device)

    return common.run_points_metrics(draw, args, device, args.dataset)


@torch.no_grad()
def figure3(G, F, real, args, device, path, n=2000):
    """Figure 3, one row: (a) z~ = F(x) of real data coloured by mode, (b) z ~ P_z coloured by the
    mode its G(z) lands nearest to, (c) samples G(z) (red) over the data (grey), (d) share of
    high-quality samples per mode, with the uniform share 1/K dashed, and its reverse KL (the
    paper's Sec. 5.1 form, common.reverse_kl_hq)."""
    centers, std = common.synthetic_modes(args.dataset, args.data_std)
    x, y = real
    z_inv = F(x[:n].to(device)).float().cpu()
    z = common.fixed_noise(n, args.z_dim, device)
    fake = G(z).float().cpu()
    dist = torch.cdist(fake, centers)                                   # (n, K)
    nearest = dist.argmin(1)
    good = dist.min(1).values <= 3 * std                                # Table 1's quality rule
    share = torch.bincount(nearest[good], minlength=len(centers)).float() / n
    zlim = (-4, 4, -4, 4)
    panels = [
        common.plot_points([(z_inv[:, :2].numpy(), y[:n].numpy())], zlim, size=300,
                           title="F(x): inverse of real data, by mode"),
        common.plot_points([(z[:, :2].cpu().numpy(), nearest.numpy())], zlim, size=300,
                           title="z ~ N(0,I), by mode of G(z)"),
        common.plot_points([(x[:n].numpy(), common.REAL_COLOR), (fake.numpy(), common.FAKE_COLOR)],
                           common.extent_for(args.dataset), size=300, centers=centers,
                           title="samples G(z) (red), data (grey)"),
        common.plot_bars(share.numpy(), size=(300, 150), reference=1.0 / len(centers),
                         title=f"high-quality share per mode; reverse KL (hq) "
                               f"{common.reverse_kl_hq(fake.numpy(), args.dataset, args.data_std):.3f}"),
    ]
    common.hconcat(panels, path)


def save_samples(G, F, stream_data, args, device, step, out, is_points):
    path = os.path.join(out, "samples", f"step_{step:07d}.png")
    if is_points:
        figure3(common.unwrap(G), common.unwrap(F), stream_data, args, device, path)
    else:
        with torch.no_grad():
            z = common.fixed_noise(64, args.z_dim, device)
            net = common.unwrap(G)
            common.save_image_grid(common.sample_bn_batch(net, z) if args.arch == "pacgan" else net(z), path, nrow=8)


def load_sampler(ckpt_path, device="cpu"):
    """For evaluate.py: a function n -> n samples of the checkpoint's G (points or images in [-1, 1])."""
    ckpt = common.load_checkpoint(ckpt_path, method=METHOD)
    args = argparse.Namespace(**ckpt["args"])
    channels = common.DATASETS[args.dataset]["channels"]
    G, _, _, _ = build_networks(args, channels)
    G = common.load_generator(G, ckpt, ckpt_path, device)

    def sample(n):
        if args.arch == "pacgan":         # PacGAN's sampler: all z first, batches of 128 on batch statistics
            return common.sample_bn_batch(G, torch.randn(n, args.z_dim, device=device)).float().cpu()
        return common.generate(G, n, args.z_dim, device, batch=10_000, z_device=device)

    sample.dataset = args.dataset
    sample.data_std = args.data_std
    return sample


# ==================================================================================================
# 7. Training (Eq. 10: min_{G,F} max_D V(G, D) + L_cons(G, F) + L_Gau(F))
# ==================================================================================================

def d_step(G, D, opt_d, x, z, rt):
    """One update of D: max_D V(G, D) (Eq. 4). G only produces inputs here (under no_grad). Under
    torchrun D sees this rank's share of x and z; the loss is a per-sample mean, so DDP's gradient
    average equals the gradient on the global batch."""
    with rt.autocast():
        with torch.no_grad():
            fake = G(z)
        # Real and fake in one forward: one DDP reduction per backward, and the same
        # spectral-norm power iteration for both halves (apart for a BN D: common.d_real_fake).
        d_real, d_fake = common.d_real_fake(D, x, fake)
        d_loss = gan_loss_d(d_real.float(), d_fake.float())
    opt_d.zero_grad(set_to_none=True)
    rt.backward_step(d_loss, opt_d)
    return d_loss


def dz_step(F, Dz, opt_dz, x, z_prior, rt):
    """One update of D_z (zdisc, App. A.1, Eq. 13): max_{D_z} E log D_z(z) + E log(1 - D_z(F(x))),
    z ~ P_z. F only produces inputs here. Ours: on the codes of the D step's real batch x, against
    len(z_prior) = --prior-samples / world prior samples: Sec. 4.2(4) asks for as many samples of
    P_z as possible, and as each half of the loss is a mean, more prior samples only make its real
    half less noisy."""
    with rt.autocast():
        with torch.no_grad():
            z_inv = F(x)
        zlog = Dz(torch.cat([z_prior, z_inv.to(z_prior.dtype)])).float()
        dz_loss = gan_loss_d(zlog[:len(z_prior)], zlog[len(z_prior):])
    opt_dz.zero_grad(set_to_none=True)
    rt.backward_step(dz_loss, opt_dz)
    return dz_loss


def gf_losses(G, F, D, Dz, x, z, args, rt):
    """The (G, F) side of Eq. 10 on real x and noise z: (GAN term, L_cons, L_Gau).

    D and Dz are the plain (unwrapped) critics, read but not trained: call this inside
    `frozen(D, Dz)` so that their weight gradients are not computed at all.
    """
    with rt.autocast():
        fake = G(z)                                 # G(z)
        z_rec = F(fake)                             # F(G(z))
        z_inv = F(x)                                # z~ = F(x), (B, l)
        x_rec = G(z_inv)                            # G(F(x))
        g_adv = gan_loss_g(D(fake).float())         # reaches G only
    cons = consistency_loss(z.float(), z_rec.float(), x.float(), x_rec.float())
    if args.gauss_loss == "none":
        gauss = torch.zeros((), device=z.device)
    elif args.gauss_loss == "zdisc":
        # Eq. 13 for F: fool D_z (non-saturating form, ours, as for G); per-rank mean, see dz_step.
        with rt.autocast():
            gauss = gan_loss_g(Dz(z_inv).float())
    else:
        # mu and Sigma of the global batch under torchrun (batch_gaussian); reaches F only.
        mu, sigma = batch_gaussian(z_inv)
        gauss = gaussian_loss(args.gauss_loss, mu, sigma, p=args.p, eps=args.eig_eps).float()
    return g_adv, cons, gauss


@contextlib.contextmanager
def frozen(*nets):
    """Weights of `nets` need no gradient inside (a critic in G's loss: the G step would compute its
    weight gradients and throw them away)."""
    nets = [n for n in nets if n is not None]
    for net in nets:
        net.requires_grad_(False)
    try:
        yield
    finally:
        for net in nets:
            net.requires_grad_(True)


def train(args, rt, dataset):
    info = common.DATASETS[args.dataset]
    is_points = info["kind"] == "points"
    channels = info["channels"]
    stream = common.BatchStream(dataset, args.batch_size, rt, seed=args.seed,
                                num_workers=args.num_workers)
    if args.gauss_loss == "zdisc" and args.prior_samples % rt.world_size:
        raise common.UsageError(f"--prior-samples {args.prior_samples} is not divisible by the world "
                                f"size {rt.world_size}")

    # Same seed on every rank -> identical initial weights; then per-rank noise streams.
    G, D, F, Dz = build_networks(args, channels)
    common.seed_rank(rt, args.seed)
    G, D, F = rt.wrap(G), rt.wrap(D), rt.wrap(F)
    Dz = rt.wrap(Dz) if Dz is not None else None
    betas = (args.beta1, args.beta2)
    # One optimiser for G and F together: Eq. 10 minimises over (G, F) jointly.
    opt_gf = common.adam(list(G.parameters()) + list(F.parameters()), lr=args.lr, betas=betas)
    lr_d = args.lr if getattr(args, "lr_d", None) is None else args.lr_d     # --lr-d, default --lr
    opt_d = common.adam(D.parameters(), lr=lr_d, betas=betas)
    opt_dz = common.adam(Dz.parameters(), lr=lr_d, betas=betas) if Dz is not None else None

    # Optional EMA of G's weights (ours): the generator that samples and metrics use.
    ema = common.EMA(G, args.ema).to(rt.device) if args.ema > 0 else None
    nets = {"G": G, "D": D, "F": F, "Dz": Dz, "G_ema": ema}
    opts = {"opt_gf": opt_gf, "opt_d": opt_d, "opt_dz": opt_dz}
    step = 0
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume:
        ckpt = common.load_checkpoint(ckpt_path, method=METHOD)
        step = common.restore_training_state(ckpt, nets, opts, rt, stream, args.seed, ckpt_path)

    log = common.Logger(args.out, rt.is_main, args.steps, start_step=step)
    meter = common.LossMeter(rt)
    log.info(f"InvertGAN on {args.dataset}: {args.steps} steps, global batch {args.batch_size} on "
             f"{rt.world_size} process(es), {rt.device}, L_Gau={args.gauss_loss}, "
             f"lambda_cons={args.lambda_cons}, lambda_gauss={args.lambda_gauss}, seed {args.seed}; "
             f"G {common.count_params(G)} / D {common.count_params(D)} / F {common.count_params(F)} params")
    D_plain = common.unwrap(D)          # D inside G's loss: no DDP gradient sync (see common.Runtime.wrap)
    Dz_plain = common.unwrap(Dz) if Dz is not None else None
    # A fixed random subset of the data for the Figure 3 panels (the dataset is sorted by mode).
    pick = common.seeded_subset(len(dataset), 2000)
    fixed_real = (dataset.points[pick], dataset.labels[pick]) if is_points else None
    per_rank = args.batch_size // rt.world_size

    # Ctrl-C / SIGTERM: stop after this step, saved; a checkpoint at the last step; timing.
    run = common.RunControl(rt, args, step, meter, ckpt if args.resume else None)
    while run.going(step):
        # lr of this step: constant, then linear to 0 after --lr-decay-from (a function of the
        # step alone, so a resumed run gets the same values).
        factor = common.lr_factor(step, args.steps, args.lr_decay_from)
        lr = args.lr * factor
        common.set_lr((opt_gf,), lr)
        common.set_lr((opt_d, opt_dz), lr_d * factor)
        # Eq. 10: min_{G,F} max_D V(G, D) + lambda_cons L_cons(G, F) + lambda_gauss L_Gau(F),
        # alternating: n_dis updates of the critics, then one of (G, F).
        # ---- max side: D on V (Eq. 4); with zdisc also D_z on Eq. 13 (App. A.1; ours: as often
        # as D, on the same real batch: the appendix only says "alternating training").
        for _ in range(args.n_dis):
            x_real, _ = next(stream)
            z = torch.randn(per_rank, args.z_dim, device=rt.device)
            z_prior = (torch.randn(args.prior_samples // rt.world_size, args.z_dim, device=rt.device)
                       if Dz is not None else None)
            d_loss = d_step(G, D, opt_d, x_real, z, rt)
            if Dz is not None:
                meter.add(dz_loss=dz_step(F, Dz, opt_dz, x_real, z_prior, rt))

        # ---- min side: G and F on V + lambda_cons L_cons + lambda_gauss L_Gau, critics frozen.
        # The real batch is x_real, the *last D step's* (ours: the paper does not say; a fresh batch
        # would cost one more read per step and change nothing in expectation); a fresh z.
        z = torch.randn(per_rank, args.z_dim, device=rt.device)
        with frozen(D_plain, Dz_plain):
            g_adv, cons, gauss = gf_losses(G, F, D_plain, Dz_plain, x_real, z, args, rt)
            gf_loss = g_adv + args.lambda_cons * cons + args.lambda_gauss * gauss          # Eq. 10
            opt_gf.zero_grad(set_to_none=True)
            rt.backward_step(gf_loss, opt_gf)
        step += 1
        if ema is not None:
            ema.step(G, step, args.ema_start)      # a copy of G until --ema-start, then the average
        meter.add(d_loss=d_loss, g_loss=g_adv, cons=cons, gauss=gauss)

        # ---- logging / checks / pictures / checkpoint (main process writes)
        if step % args.log_every == 0 or step == args.steps:
            common.log_step(meter, log, step, ckpt_path, lr=lr)
        if rt.is_main and (step % args.sample_every == 0 or step == args.steps):
            save_samples(G if ema is None else ema.shadow, F, fixed_real, args, rt.device, step,
                         args.out, is_points)
        if run.checkpoint_due(step):                            # collective: every rank calls it
            common.save_training_state(ckpt_path, METHOD, args, step, nets, opts, rt, stream, **run.state())
    run.end(step)
    return (G if ema is None else ema.shadow), F, dataset


def final_metrics(G, args, rt, dataset):
    """metrics.json: Table 1 metrics for 2-D data; IS/FID/Mode Score for images (Sec. 5.2)."""
    G = common.unwrap(G).eval()
    if common.DATASETS[args.dataset]["kind"] == "points":
        return evaluate_points(G, args, rt.device)
    if args.dataset.startswith("stacked"):   # no classifier flag here: load_sampler + tests/bench_pacgan.py table
        return {"skipped": "stacked data: modes are counted from ckpt.pt (tests/bench_pacgan.py table)"}
    def draw(n):
        return common.generate(G, n, args.z_dim, rt.device, z_device=rt.device)

    # Against the images G trains on (ours: the paper names no split; STL-10: train+unlabeled).
    return common.run_image_metrics(draw, args, ["fid", "is", "ms"], rt.device, args.dataset, split="train")


def main(argv=None):
    args = common.restore_saved_args(parse_args(argv), METHOD, common.RUN_CONTROL)
    rt = common.setup_runtime(args.device, args.amp, args.seed, args.compile, args.threads)
    # The data first: a missing or broken dataset stops the run before anything is written.
    dataset = common.build_dataset(args.dataset, root=args.data_root, img_size=args.img_size,
                                   download=args.download, data_std=args.data_std,
                                   redraw=bool(getattr(args, "redraw", False)))
    common.prepare_out_dir(args.out, args, args.resume, rt.is_main)
    start = time.perf_counter()
    G, F, dataset = train(args, rt, dataset)
    if rt.is_main:
        with common.metric_precision():          # no TF32 / cuDNN autotuning for metrics, as evaluate.py
            metrics = final_metrics(G, args, rt, dataset)
        common.finish_run(rt, args, metrics, start)
    common.shutdown(rt)


if __name__ == "__main__":
    common.run_cli(main)
