"""MaEM-GAN: Combating Mode Collapse in GANs via Manifold Entropy Estimation.

Paper: Liu, Li, Wu, Liang, Huang, Li, Ghanem, Zheng, "Combating Mode Collapse in GANs via Manifold
Entropy Estimation", AAAI 2023 (arXiv:2208.12055; text in ../shared/papers/maem_gan.txt).
Authors' code: https://github.com/HaozheLiu-ST/MEE (read for facts; `--variant official`).

The idea in three lines:
  * D outputs an m-dim code V = D(x) whose mean is the realness (L_MaF, Eq. 7); WGAN plus the
    entropy of P_g bounds the EBM loss (Eq. 6), so maximising H(P_g) too should prevent collapse.
  * H(P_g) through the codes (Prop. 2): push each new code away from its nearest code in a FIFO
    replay buffer of past codes (RB-MaEM, Eq. 8).
  * Keep the code space on the data manifold: DLLE (Eq. 12-13) pulls a sample and a slightly
    transformed copy together; DIsoMap (Eq. 14) aligns the direction of a mix's code with the same
    mix of the two codes (a cosine; the authors' MSE matches the code itself: --variant official).

Launch:
    python maem_gan.py --dataset ring                                  # 2-D quick start (CPU)
    python maem_gan.py --dataset cifar10 --data-root data/cifar10 --download      # one GPU
    torchrun --standalone --nproc_per_node=8 maem_gan.py --dataset celeba --data-root data/celeba
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 maem_gan.py --dataset ffhq --data-root data/ffhq   # two nodes
    python maem_gan.py --dataset cifar10 --variant official [--authors-buffer]   # the authors' code [+ its bug]
    python maem_gan.py --dataset cifar10 --no-entropy --no-dlle        # a Table 1 ablation row
    python maem_gan.py --dataset ring --out runs/x --resume            # continue a run
    python evaluate.py ckpt runs/maem_gan-cifar10-0/ckpt.pt --n 50000 --metrics fid,is,ivar

Map of the paper to this file:
    Eq. 7     L_MaF, the m-dim WGAN loss           -> maf_loss_d / maf_loss_g
    Suppl.    re-parameterised code V              -> embed (Suppl. = the Implementation Details)
    Eq. 8     RB-MaEM entropy loss + buffer        -> ReplayBuffer, entropy_loss ("paper");
              the authors' buffer (--authors-buffer)  -> AuthorsReplayBuffer
              who minimises it on which codes        -> section 5's header, d_step_loss / g_step_loss
              is D's code space alive?               -> health (log), code_directions (metrics.json)
    Eq. 9-11  why nearest-neighbour distances      -> the comment above ReplayBuffer
    Eq. 12-13 DLLE                                 -> dlle_transform, dlle_loss
    Eq. 14    DIsoMap                              -> isomap_mix, isomap_loss
    Tables 1-3 ablations, F, buffer size           -> --no-disomap / --no-dlle / --no-entropy,
                                                      --dlle-transform, --buffer-size
    Fig. 3    top-5 samples per code dimension     -> figure3 (OUT/figure3.png)
    Suppl.    settings per dataset                 -> PRESETS
"""

import argparse
import contextlib
import math
import os
import time

import torch
import torch.nn.functional as F_nn

import common

METHOD = "maem_gan"

# ==================================================================================================
# 1. Arguments and per-dataset presets
# ==================================================================================================

# Flags left at None take their values from these tables, each over the one before: PRESETS[dataset],
# BACKBONE_PRESETS[(dataset, --arch)] (stylegan2: + stylegan2_preset), the --variant's. Sources: "Suppl."
# = the paper's Implementation Details; "Official code: FILE" = HaozheLiu-ST/MEE; "ours" = neither. sigma:
# Suppl. gives values, no equation; that it weights L_ent is ours (section 5). `data`, `split`: common.py's.
_NO_EXTRAS = dict(  # no backbone extras: the paper names none for its DCGAN and ResNet
    ema=0.0, ema_start=0, r1_gamma=0.0, r1_every=1, pl_weight=0.0, pl_every=1, style_mixing=0.0, attn_res=[])
_CIFAR = dict(
    _NO_EXTRAS,
    # Suppl. "CIFAR-10": DCGAN, z 64, m 16, Adam 1e-4 (0, 0.999), lr x0.9 every 50 epochs, batch 64,
    # sigma 5e-4, lambda 0, F = rotation + Gaussian noise; 50K samples (paper, "Evaluation metrics").
    arch="dcgan", img_size=32, z_dim=64, m=16, lr=1e-4, beta1=0.0, beta2=0.999, lr_decay=0.9,
    lr_decay_epochs=50, batch_size=64, sigma=5e-4, lambda_norm=0.0, dlle_transform="rot-noise", eval_samples=50_000,
    # Official code: README n_critic 3; train.py's unit weights on L_Iso and L_LLE (the paper: none);
    # width 64 = models.py's DCGAN (G 512-256-128, D 128-256-512; the paper names DCGAN only).
    n_critic=3, iso_weight=1.0, dlle_weight=1.0, width=64,
    # The paper's: Eq. 7's L_MaF, the epoch decay only, no noise anneal. Ours: F's noise std 0.05 (the
    # paper gives none; train.py's: 0.001); 100K G steps (the official README's run: ~562K); logging.
    loss="maf", lr_decay_from=1.0, dlle_noise_anneal=None, dlle_noise=0.05, steps=100_000,
    log_every=200, sample_every=5000, ckpt_every=5000,
    # --arch mlp (2-D) only, ours: D with spectral norm (Eq. 10's Lipschitz D, as models.py's) and ReLU.
    d_spectral_norm=True, d_act="relu")
# 2-D mixtures (not in the paper; all ours, chosen on grid seeds 0-9 and 14: README "MaEM-GAN on 2-D
# data", with the paper's settings failing there). No SN: Eq. 10-11's Lipschitz premise does not hold.
_TOY = dict(
    _NO_EXTRAS,
    # 4-layer MLPs of 128 units, z 2, m 16; D with LeakyReLU 0.2 (as models.py's; with ReLU one died).
    arch="mlp", img_size=1, width=128, z_dim=2, m=16, d_act="leaky_relu", split="train",
    # Non-saturating loss, no spectral norm, one D step per G step, lr 1e-3 falling linearly to 0
    # over the second half (as InvertGAN's 2-D presets); 10K steps.
    loss="ns", d_spectral_norm=False, lr=1e-3, beta1=0.0, beta2=0.9, n_critic=1, lr_decay_from=0.5,
    lr_decay=1.0, lr_decay_epochs=1, steps=10_000,
    # sigma as CelebA's, lambda 0, unit weights; F = Gaussian noise annealed to 0 from 25 % of the run
    # (it balances the modes early and blurs them if kept; end and std per dataset).
    sigma=5e-2, lambda_norm=0.0, iso_weight=1.0, dlle_weight=1.0, dlle_transform="noise",
    log_every=500, sample_every=5000, ckpt_every=5000)
# Suppl. "ANIMEFACE": ResNet (Kang & Park's; ours: common.py's SNGAN-style), z 128, m 32, Adam 1e-4
# (0, 0.9), sigma 5e-4, lambda 5, Gaussian noise for F, no lr decay stated; "FFHQ": "similar to
# those of ANIMEFACE". Batch, n_critic, steps: CIFAR-10's (ours). Image folders.
_ANIME = dict(_CIFAR, data="folder", split="train", arch="resnet", z_dim=128, m=32, beta2=0.9,
              lambda_norm=5.0, lr_decay=1.0, dlle_transform="noise")
# Mode-coverage runs (not in the paper): CIFAR-10's DCGAN settings (ours); PacGAN's 25,600 samples,
# as every stacked count (common.STACKED_SAMPLES).
_STACKED = dict(_CIFAR, split="train", eval_samples=common.STACKED_SAMPLES, log_every=100, sample_every=2000,
                ckpt_every=2000)
PRESETS = {
    "cifar10": dict(_CIFAR, data="cifar10", split="all"),     # Official code: train.py trains on train+test
    # Suppl. "CelebA": 256x256, z 128, m 32, x0.9 every epoch, noise F, sigma 5e-2, the rest as CIFAR-10.
    # Ours: x0.9 every 10 epochs (per epoch: lr < 5e-6 from G step ~25K of 100K; --lr-decay-epochs 1
    # for the paper's); split train; logging. DCGAN at 256: common.py caps channels at 512.
    "celeba": dict(_CIFAR, data="celeba", split="train", img_size=256, z_dim=128, m=32, sigma=5e-2, lr_decay_epochs=10,
                   dlle_transform="noise", log_every=100, sample_every=2000, ckpt_every=2000),
    "animeface": dict(_ANIME, img_size=64),             # Suppl.: 64x64
    "ffhq": dict(_ANIME, img_size=128),                 # ours: a small stand-in (the paper's: --arch stylegan2)
    "stacked-mnist": dict(_STACKED, data="stacked-mnist"),
    "stacked-fashion-mnist": dict(_STACKED, data="stacked-fashion-mnist"),
    # F's noise std twice the ring's mode std (0.01), gone at 75 %; 50K samples (PGMGAN's 2-D protocol).
    "ring": dict(_TOY, data="ring", batch_size=128, dlle_noise=0.02, dlle_noise_anneal=(0.25, 0.75), eval_samples=50_000),
    # The grid's mode std (0.05); batch 256 and the noise gone at 60 % sharpen 25 modes (README);
    # 100K samples (25 modes instead of 8).
    "grid": dict(_TOY, data="grid", batch_size=256, dlle_noise=0.05, dlle_noise_anneal=(0.25, 0.6), eval_samples=100_000),
}
_TOY_SOURCE = ("ours (not in the paper): MLPs (LeakyReLU D), non-saturating loss, no SN, lr 1e-3 decayed, "
               "n_critic 1, 10K steps, batch {}, DLLE noise annealed over 25-{} %")
PRESET_SOURCES = {
    "cifar10": "Suppl. 'CIFAR-10' (+ n_critic 3 from the official README; train+test images)",
    "celeba": "Suppl. 'CelebA' (256, DCGAN, sigma 5e-2, noise F); lr x0.9 per 10 epochs (ours; paper: per epoch)",
    "animeface": "Suppl. 'ANIMEFACE' (64, ResNet, betas (0, 0.9), sigma 5e-4, lambda 5); image folder",
    "ffhq": "Suppl. 'FFHQ' says StyleGAN2 + AnimeFace settings; here ResNet at 128 (ours; the paper's: --arch stylegan2); image folder",
    "stacked-mnist": "ours: CIFAR-10's DCGAN settings, for mode counting (1000 modes)",
    "stacked-fashion-mnist": "ours: CIFAR-10's DCGAN settings, for mode counting (1000 modes)",
    "ring": _TOY_SOURCE.format(128, 75),
    "grid": _TOY_SOURCE.format(256, 60),
}
# The paper's large backbones (Tables 6-7) and PacGAN's protocol, keyed (dataset, --arch): their
# values replace the dataset preset's; the MaEM terms (m, sigma, lambda, F) stay the dataset's.
BACKBONE_PRESETS = {
    # Official code (BigGAN-PyTorch launch_cifar_ema.sh, train.py defaults): batch 50 (two GPUs, BN
    # sees 2x25; ours 50 per process), 4 D steps per G step, lr 2e-4, Adam (0, 0.999), z 128, ch 64,
    # hinge loss, G EMA 0.9999 from G step 1000, 500 epochs of 50K images (= 125K G steps).
    ("cifar10", "biggan"): dict(split="train", arch="biggan", z_dim=128, width=64, batch_size=50, n_critic=4, lr=2e-4,
                                beta1=0.0, beta2=0.999, loss="hinge", steps=125_000, lr_decay=1.0, ema=0.9999, ema_start=1000),
    # StyleGAN2 (Table 7): FFHQ / CelebA at 256 by default (--img-size 1024: the paper's FFHQ),
    # AnimeFace at 64 (Suppl.); non-saturating loss, 1 D step, no lr decay; the rest: stylegan2_preset.
    ("ffhq", "stylegan2"): dict(arch="stylegan2", img_size=256, n_critic=1, loss="ns", lr_decay=1.0, width=64),
    ("celeba", "stylegan2"): dict(arch="stylegan2", img_size=256, n_critic=1, loss="ns", lr_decay=1.0, width=64),
    ("animeface", "stylegan2"): dict(arch="stylegan2", img_size=64, n_critic=1, loss="ns", lr_decay=1.0, width=64),
}
# PacGAN's stacked-MNIST protocol (fjxmlzn/PacGAN D=0.25G model.py / config.py; tests/bench_pacgan.py):
# G and reduced BN D (no SN, --d-width 2) at 28x28, z 256, batch 128, Adam (0.5, 0.99), lr 1e-4 G /
# 2e-4 D, 1 D step, no decay, fresh triplets (--redraw), 25,600 counted samples, 500K steps. Ours: its
# BCE on the realness (--loss ns) for L_MaF, a critic loss whose D must be Lipschitz (this D is not);
# a fresh z for the G step (Eq. 7's paper path; PacGAN and --variant official reuse the D step's).
_PACGAN = dict(arch="pacgan", img_size=28, z_dim=256, width=8, d_width=2, batch_size=128, lr=1e-4, lr_d=2e-4,
               beta1=0.5, beta2=0.99, n_critic=1, loss="ns", lr_decay=1.0, redraw=True, steps=500_000,
               eval_samples=25_600, log_every=500, sample_every=5000, ckpt_every=5000)
BACKBONE_PRESETS.update({("stacked-mnist", "pacgan"): _PACGAN, ("stacked-fashion-mnist", "pacgan"): _PACGAN})
# --variant official, where the flag was not given (Official code: train.py): F = a random flip +
# N(0, 0.001) noise, the entropy weight warmed up over 100 epochs, real images flipped at random
# (RandomHorizontalFlip), an SN D (its extrapolating DIsoMap needs one: README); on 2-D data L_MaF
# (they have no 2-D run: the presets' optimiser stays). --variant paper: no warm-up, no flips.
OFFICIAL_DEFAULTS = dict(dlle_transform="flip-noise", dlle_noise=0.001, entropy_warmup=100, hflip=True, d_spectral_norm=True)
OFFICIAL_DEFAULTS_2D = dict(OFFICIAL_DEFAULTS, loss="maf")
PAPER_DEFAULTS = dict(entropy_warmup=0, hflip=False)
VARIANTS = ("paper", "official")
DLLE_TRANSFORMS = ("rot-noise", "noise", "adv", "flip-noise", "none")
RUN_CONTROL = common.RUN_CONTROL + ("classifier", "fig3_samples")        # what a --resume may change


def stylegan2_preset(img_size):
    """StyleGAN2's recipe at `img_size` from common.STYLEGAN2_CONFIGS: 'paper256' below 512 pixels
    (ours below 256), 'paper512' at 512, 'stylegan2' (config F) at 1024."""
    cfg = common.STYLEGAN2_CONFIGS["paper256" if img_size < 512 else "paper512" if img_size < 1024 else "stylegan2"]
    return cfg, dict(batch_size=cfg["batch"], lr=cfg["lr"], z_dim=cfg["z_dim"], beta1=cfg["betas"][0],
                     beta2=cfg["betas"][1], r1_gamma=cfg["r1_gamma"], r1_every=cfg["d_reg_every"], ema_start=0,
                     pl_weight=cfg["pl_weight"], pl_every=cfg["g_reg_every"], style_mixing=cfg["style_mixing"],
                     steps=cfg["kimg"] * 1000 // cfg["batch"])


def preset(args):
    """The values flags left at None take: the tables above, each over the one before."""
    values = dict(PRESETS[args.dataset], **BACKBONE_PRESETS.get((args.dataset, args.arch), {}))
    if args.arch == "stylegan2":
        cfg, recipe = stylegan2_preset(args.img_size or values["img_size"])
        # Official code: the G EMA's half-life is ema_kimg thousand images.
        values.update(recipe, ema=0.5 ** ((args.batch_size or cfg["batch"]) / (cfg["ema_kimg"] * 1000)))
    if args.variant == "official":
        return dict(values, **(OFFICIAL_DEFAULTS_2D if PRESETS[args.dataset]["arch"] == "mlp" else OFFICIAL_DEFAULTS))
    return dict(values, **PAPER_DEFAULTS)


def presets_help():
    """--help's epilog: the tables above, as they are."""
    backbones = {f"{d} --arch {a}": values for (d, a), values in BACKBONE_PRESETS.items()}
    variants = {"--variant paper": PAPER_DEFAULTS, "--variant official": OFFICIAL_DEFAULTS,
                "--variant official, 2-D data": OFFICIAL_DEFAULTS_2D}
    return common.presets_epilog(PRESETS, PRESET_SOURCES, (
        "backbone presets (--dataset D --arch A replaces these values; stylegan2 also takes stylegan2-ada-pytorch's "
        "'paper256' below 512 px, 'paper512', 'stylegan2' (config F) at 1024: stylegan2_preset):", backbones),
        ("variant defaults (over the presets, where the flag was not given):", variants))


def build_parser():
    p = common.ArgParser(description=__doc__.split("\n\n")[0], epilog=presets_help(),
                         formatter_class=common.PresetHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(PRESETS),
                   help="cifar10 (Suppl., DCGAN; --arch biggan: Table 6), celeba (Suppl., 256, DCGAN), animeface / "
                        "ffhq (image folders, ResNet; --arch stylegan2: Table 7), stacked-(fashion-)mnist, ring, grid (ours; "
                        "they run the method, they do not show it: D's codes fall onto one ray, D reaches chance "
                        "early, the no-term baseline covers the same modes and no seed meets the spread targets; README)")
    p.add_argument("--variant", default="paper", choices=VARIANTS,
                   help="paper: Eq. 8, 12-14 as written; official: train.py's losses and defaults (below), with "
                        "FIFO buffers (theirs: --authors-buffer) and 1 SN power iteration per D step (theirs: 5)")
    g = p.add_argument_group("model and optimisation (defaults: the dataset's preset)")
    g.add_argument("--steps", type=int, default=None, help="G updates (ours: 100K on images, 10K on 2-D data)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch (Suppl.: 64)")
    g.add_argument("--arch", default=None, choices=["mlp", "dcgan", "resnet", "biggan", "stylegan2", "pacgan"],
                   help="backbone (Suppl.: DCGAN on CIFAR-10/CelebA, ResNet on AnimeFace; Tables 6-7: biggan, "
                        "stylegan2; pacgan: PacGAN's stacked-MNIST protocol; recipes: the backbone presets)")
    g.add_argument("--loss", default=None, choices=["maf", "hinge", "ns"],
                   help="adversarial loss on the realness (1/m) sum_k V_k: maf = L_MaF (Eq. 7); hinge (BigGAN's) "
                        "or ns = non-saturating (StyleGAN2's): ours, this script's section 2")
    g.add_argument("--d-spectral-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="spectral norm on the MLP D (--arch mlp; the image Ds always carry it); 2-D presets: off "
                        "(ours: it drops Eq. 10's Lipschitz premise, README)")
    g.add_argument("--d-act", default=None, choices=["relu", "leaky_relu"],
                   help="activation of the MLP D (--arch mlp); 2-D presets: leaky_relu 0.2 (ours, README)")
    g.add_argument("--scalar-head", action="store_true", help="D outputs one number, no code: with --no-entropy "
                   "--no-dlle --no-disomap the backbone's own baseline (Tables 6-7's first rows)")
    g.add_argument("--width", type=int, default=None, help="base channels (64: the official DCGAN's 512-256-128; "
                   "biggan: BigGAN's ch; stylegan2: channel base and max x width / 64) / MLP units")
    g.add_argument("--img-size", type=int, default=None,
                   help="resolution (32 CIFAR-10, 256 CelebA, 64 AnimeFace; stylegan2 on FFHQ: 256, or 1024 as the paper)")
    g.add_argument("--z-dim", type=int, default=None, help="noise dimension (Suppl.: 64 CIFAR-10, 128 CelebA/AnimeFace)")
    g.add_argument("--m", "--code-dim", dest="m", type=int, default=None, help="code dimension m of D (Suppl.: 16 "
                   "CIFAR-10, 32 CelebA/AnimeFace); --code-dim under torchrun (its parser rejects --m as ambiguous)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate of G and D (Suppl.: 1e-4)")
    g.add_argument("--lr-d", type=float, default=None, help="D's learning rate if not --lr (pacgan: 2e-4, PacGAN)")
    common.add_pacgan_args(g)
    g.add_argument("--beta1", type=float, default=None, help="Adam beta1 (Suppl.: 0.0)")
    g.add_argument("--beta2", type=float, default=None, help="Adam beta2 (Suppl.: 0.999 CIFAR-10, 0.9 AnimeFace)")
    g.add_argument("--n-critic", type=int, default=None,
                   help="D updates per G update (official README: 3; 2-D presets: 1, ours). On the ring 3 widens "
                        "the modes to the spread target's edge at some cost in balance; on the grid (seed 0) it "
                        "costs a mode or the balance (README)")
    g.add_argument("--lr-decay", type=float, default=None, help="lr factor per --lr-decay-epochs (Suppl.: 0.9)")
    g.add_argument("--lr-decay-epochs", type=int, default=None, help="epochs between lr decays (Suppl.: 50 CIFAR-10, 1 CelebA)")
    g.add_argument("--lr-decay-from", type=float, default=None, help="fraction of --steps after which the lr falls "
                   "linearly to 0 (ours, 2-D presets; 1 = never, the paper's)")
    g.add_argument("--ema", type=float, default=None, help="decay of an EMA of G's weights for samples and metrics, "
                   "0 = none (paper: not stated; BigGAN 0.9999; StyleGAN2 0.5^(batch / (ema_kimg * 1000)))")
    g.add_argument("--ema-start", type=int, default=None, help="the EMA copies G up to this G step (BigGAN: 1000)")
    g.add_argument("--attn-res", type=int, nargs="*", default=None, help="biggan: self-attention resolutions (official: none)")
    g = p.add_argument_group("StyleGAN2 regularisers (--arch stylegan2; official: stylegan2-ada-pytorch)")
    g.add_argument("--r1-gamma", type=float, default=None, help="R1 weight gamma on real images (official: 1 at 256 "
                   "paper256, 10 config F; 0 = off)")
    g.add_argument("--r1-every", type=int, default=None, help="lazy R1: every N D steps (official: 16)")
    g.add_argument("--pl-weight", type=float, default=None, help="path-length weight (official: 2; 0 = off)")
    g.add_argument("--pl-every", type=int, default=None, help="lazy path length: every N G steps (official: 4)")
    g.add_argument("--style-mixing", type=float, default=None, help="style-mixing probability (official: 0.9)")
    g = p.add_argument_group("MaEM terms (Eq. 8, 12-14) and the Table 1-3 ablations")
    g.add_argument("--sigma", type=float, default=None, help="weight of L_ent (Suppl.'s sigma: 5e-4 CIFAR-10/"
                   "AnimeFace, 5e-2 CelebA; that it weights L_ent: ours, as train.py's entropy_lr)")
    g.add_argument("--lambda-norm", type=float, default=None, help="lambda of Eq. 8's ||V0|| (Suppl.: 0 CIFAR-10, "
                   "5 AnimeFace); in D's L_ent only, so times sigma (ours); unused by --variant official")
    g.add_argument("--buffer-size", type=int, default=1024, help="replay buffer length (Suppl./Table 3: 1024)")
    g.add_argument("--authors-buffer", action="store_true", help="--variant official only: the authors' replay "
                   "buffer, bug included (one slot per batch position after 17 updates: AuthorsReplayBuffer)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips of real images (paper: none stated; official code: on)")
    g.add_argument("--entropy-warmup", type=int, default=None, help="epochs of sigma's linear warm-up from 0 "
                   "(paper: not stated; --variant paper: 0 = none; official code: 100)")
    g.add_argument("--dlle-transform", default=None, choices=DLLE_TRANSFORMS, help="F(x) of DLLE (Table 2): "
                   "rot-noise (CIFAR-10), noise (CelebA/AnimeFace), adv, flip-noise (official code), none (= --no-dlle)")
    g.add_argument("--dlle-noise", type=float, default=None,
                   help="std of F's Gaussian noise and step of the adversarial noise (ours: 0.05; official: 0.001)")
    g.add_argument("--dlle-noise-anneal", type=float, nargs=2, default=None, metavar=("FROM", "TO"),
                   help="F's noise falls linearly from --dlle-noise at fraction FROM of --steps to 0 at TO (ours, 2-D)")
    g.add_argument("--rot-degrees", type=float, default=15.0, help="max |angle| of rot-noise's random rotation (ours)")
    g.add_argument("--iso-weight", type=float, default=None, help="weight of L_Iso (paper: none stated; official: 1)")
    g.add_argument("--dlle-weight", type=float, default=None, help="weight of L_LLE (paper: none stated; official: 1)")
    g.add_argument("--no-disomap", action="store_true", help="drop DIsoMap (Eq. 14; Table 1)")
    g.add_argument("--no-dlle", action="store_true", help="drop DLLE (Eq. 12-13; Table 1)")
    g.add_argument("--no-entropy", action="store_true", help="drop RB-MaEM (Eq. 8; Table 1)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--fig3-samples", type=int, default=5000, help="generated samples ranked for Figure 3 (paper: 50K)")
    common.add_eval_args(g, "samples for metrics.json (paper, 'Evaluation metrics': 50K)", classifier=True)
    common.add_runtime_args(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.authors_buffer and args.variant != "official":
        p.error("--authors-buffer reproduces the official code's buffer: use it with --variant official")
    if args.arch == "pacgan":
        common.check_pacgan(args.dataset, args.img_size or 28)
    if args.arch in ("biggan", "stylegan2") and (args.dataset, args.arch) not in BACKBONE_PRESETS:
        keys = sorted(f"{d} --arch {a}" for d, a in BACKBONE_PRESETS if a == args.arch)
        p.error(f"--arch {args.arch} has presets for: {', '.join(keys)}")
    values = preset(args)
    common.apply_presets(args, {k: v for k, v in values.items() if k not in ("data", "split")}, METHOD)
    args.data_name, args.split = values["data"], values["split"]
    check_args(p, args)
    if args.no_dlle:
        args.dlle_transform = "none"
    if args.scalar_head:
        args.m = 1                      # the code is the one output (buffers, Figure 3)
    return args


def check_args(p, args):
    """One-line errors for values out of range or flags that do not fit --arch."""
    common.check_flags(args, positive=("z_dim", "m", "n_critic", "width", "img_size", "eval_samples",
                                       "lr", "lr_decay", "lr_decay_epochs", "buffer_size", "fig3_samples",
                                       "r1_every", "pl_every", "lr_d", "d_width"),
                       nonnegative=("beta1", "beta2", "sigma", "lambda_norm", "entropy_warmup",
                                    "dlle_noise", "rot_degrees", "iso_weight", "dlle_weight", "ema",
                                    "ema_start", "r1_gamma", "pl_weight", "style_mixing"))
    common.check_shared_flags(args)
    if args.dlle_noise_anneal is not None and not 0 <= args.dlle_noise_anneal[0] < args.dlle_noise_anneal[1] <= 1:
        p.error("--dlle-noise-anneal FROM TO needs 0 <= FROM < TO <= 1 (fractions of --steps)")
    if not args.d_spectral_norm and args.arch != "mlp":
        p.error("--no-d-spectral-norm is for --arch mlp (2-D data): the image Ds carry spectral norm by design")
    if args.d_act != "relu" and args.arch != "mlp":
        p.error("--d-act is for --arch mlp (2-D data): the image Ds have their own activations")
    if args.style_mixing > 1:
        p.error("--style-mixing must be at most 1")
    if args.arch != "stylegan2" and (args.pl_weight or args.style_mixing):
        p.error("--pl-weight and --style-mixing belong to --arch stylegan2")


# ==================================================================================================
# 2. The generalised discriminator and L_MaF (Sec. "Manifold Representation", Eq. 7)
# ==================================================================================================

def embed(D, x, sample=True, with_mu=False):
    """V = mu + eps * exp(logvar / 2) from D's head (mu, logvar), (B, 2m): the re-parameterisation trick
    (Suppl.; official DCGAN_D), float32; sample=False: mu (as the official, unused `embedding()`; for
    pictures). with_mu=True: (V, mu). A one-output D (--scalar-head): its output, (B, 1)."""
    out = D(x).float()
    if out.shape[1] == 1:               # --scalar-head: a plain D's realness, no code to sample
        return (out, out) if with_mu else out
    mu, logvar = out.chunk(2, dim=1)                       # (B, m) each
    if not sample:
        return mu
    # Every loss term takes a fresh draw of V, not mu (the paper does not say; Official code: models.py DCGAN_D).
    v = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    return (v, mu) if with_mu else v


def maf_loss_d(v_real, v_fake):
    """Eq. 7 for D: min_D E[(1/m) sum_k D_k(G(z))] - E[(1/m) sum_k D_k(x)] (mean over batch and m)."""
    return v_fake.mean() - v_real.mean()


def maf_loss_g(v_fake):
    """Eq. 7 for G, which maximises L_MaF: min_G -E[(1/m) sum_k D_k(G(z))]."""
    return -v_fake.mean()


# BigGAN / StyleGAN2 (Tables 6-7, L_MaF unsaid), ours: their loss on Eq. 7's realness r(x) = mean_k V_k(x).

def adv_loss_d(v_real, v_fake, kind="maf"):
    """D's adversarial loss on the codes (B, m): maf = L_MaF (Eq. 7); hinge (BigGAN) E[relu(1 - r(x))]
    + E[relu(1 + r(G(z)))]; ns (StyleGAN2's logistic loss) E[softplus(r(G(z)))] + E[softplus(-r(x))]."""
    if kind == "maf":
        return maf_loss_d(v_real, v_fake)
    r_real, r_fake = v_real.mean(1), v_fake.mean(1)                        # (B,) realness
    if kind == "hinge":
        return F_nn.relu(1 - r_real).mean() + F_nn.relu(1 + r_fake).mean()
    return F_nn.softplus(r_fake).mean() + F_nn.softplus(-r_real).mean()


def adv_loss_g(v_fake, kind="maf"):
    """G's: -E[r(G(z))] for maf (Eq. 7) and hinge (BigGAN's); E[softplus(-r(G(z)))] for ns (StyleGAN2's)."""
    if kind == "ns":
        return F_nn.softplus(-v_fake.mean(1)).mean()
    return maf_loss_g(v_fake)


def r1_loss(D, x):
    """StyleGAN2's R1, E ||grad_x r(x)||^2 on real x, r from mu = E[V] (ours: a draw of V adds noise)."""
    x = x.detach().requires_grad_(True)
    return common.r1_penalty(embed(D, x, sample=False).mean(1), x)


# ==================================================================================================
# 3. RB-MaEM: replay-buffer manifold entropy (Eq. 8-11)
# ==================================================================================================
# Eq. 9: an entropy estimate grows with E log d(x_i, x_i*), the nearest-neighbour distance; Eq. 10-11:
# a 1-Lipschitz D's code distances bound image distances from below, so spreading the codes raises a
# lower bound of it. The neighbours: a FIFO buffer of the last --buffer-size codes (a batch is too small).

class ReplayBuffer:
    """Eq. 8's R: a FIFO buffer of the last `size` codes, detached (gradients flow through V_0 only),
    as a circular array; `codes()` gives V_1 ... V_n oldest first. Every new code searches all of
    them: another estimator than the authors' per-position buffer (AuthorsReplayBuffer)."""

    def __init__(self, size, dim, device, fill_uniform=False, generator=None):
        self.size, self.ptr, self.count = size, 0, 0      # ptr: the next write position
        data = torch.zeros(size, dim)
        if fill_uniform:                # Official code: entropy_buffer()'s start, full of U(-1, 1) codes
            data.uniform_(-1, 1, generator=generator)
            self.count = size
        self.data = data.to(device)

    def __len__(self):
        return self.count

    @torch.no_grad()
    def push(self, codes):
        codes = codes.detach().float()[-self.size:]       # a batch longer than the buffer: its tail
        k = codes.shape[0]
        idx = (self.ptr + torch.arange(k, device=self.data.device)) % self.size
        self.data[idx] = codes
        self.ptr = (self.ptr + k) % self.size
        self.count = min(self.count + k, self.size)

    def codes(self):
        """(n, m), oldest first. Where the buffer is full the oldest entry sits at `ptr`."""
        if self.count < self.size:
            return self.data[:self.count]
        return torch.cat([self.data[self.ptr:], self.data[:self.ptr]])

    def state_dict(self):
        # The raw array and pointers, not codes(): a resumed run searches the same layout, bit for bit.
        return {"data": self.data.cpu().clone(), "ptr": self.ptr, "count": self.count}

    def load_state_dict(self, state):
        if tuple(state["data"].shape) != tuple(self.data.shape):
            raise common.UsageError(f"checkpoint replay buffer has shape {tuple(state['data'].shape)}, "
                                    f"this run wants {tuple(self.data.shape)} (--buffer-size, --m)")
        self.data.copy_(state["data"].to(self.data.device))
        self.ptr, self.count = int(state["ptr"]), int(state["count"])


class AuthorsReplayBuffer:
    """Official code (train.py, entropy_buffer / enrtopy_loss), bug included (--authors-buffer): (slots,
    B, m), one U(-1, 1) draw of (slots, m) at every batch position; sample i searches only position i
    of earlier batches; `cat(R[B:], codes[None])` drops B slots, adds one: at B = 64, 1 after 17 updates."""

    def __init__(self, size, batch, dim, device, generator=None):
        self.size, self.batch = size, batch
        init = torch.empty(size, dim).uniform_(-1, 1, generator=generator)    # (slots, m)
        self.data = init.unsqueeze(1).repeat(1, batch, 1).to(device)          # (slots, B, m)

    def __len__(self):
        return self.data.shape[0]

    @staticmethod
    def slots_after(size, batch, updates):
        """Slots per position after `updates` updates: max(s - B, 0) + 1 each time."""
        for _ in range(updates):
            size = max(size - batch, 0) + 1
        return size

    def loss(self, v0):
        """-log(mean_i min_s mean_k (R[s, i, k] - v0[i, k])^2) for the batch v0 (B, m)."""
        if v0.shape[0] != self.batch:
            raise common.UsageError(f"--authors-buffer needs {self.batch} codes per process, got {v0.shape[0]}")
        with torch.autocast(v0.device.type, enabled=False):
            dist = (self.data - v0.unsqueeze(0)).pow(2).mean(dim=2)          # (slots, B)
            return -torch.log(dist.min(dim=0).values.mean())

    @torch.no_grad()
    def push(self, codes):
        self.data = torch.cat([self.data[self.batch:], codes.detach().to(self.data.dtype).unsqueeze(0)])

    def state_dict(self):
        return {"data": self.data.cpu().clone()}

    def load_state_dict(self, state):
        slots, batch, dim = state["data"].shape
        if batch != self.batch or dim != self.data.shape[2] or slots > self.size:
            raise common.UsageError(f"checkpoint replay buffer has shape {tuple(state['data'].shape)}, "
                                    f"this run wants (<= {self.size}, {self.batch}, {self.data.shape[2]})")
        self.data = state["data"].to(self.data.device)


def nearest_by_cosine(v0, bank):
    """Eq. 8's V* = argmax_{V_i in R} V0.V_i / (|V0||V_i|) for each row of v0 (B, m) in bank (n, m):
    (V* (B, m), index (B,)). float32 also under bf16, which cannot tell cosine 0.999 from 0.997."""
    with torch.autocast(v0.device.type, enabled=False):
        sim = F_nn.normalize(v0.detach().float(), dim=1) @ F_nn.normalize(bank.float(), dim=1).T  # (B, n)
    idx = sim.argmax(dim=1)
    return bank[idx], idx


def entropy_loss(v0, buffer, lambda_norm=0.0, variant="paper"):
    """RB-MaEM loss of the codes v0 (B, m) against the buffer (0 while it is empty), batch mean.
    paper (Eq. 8): cos(V0, V*) + lambda ||V0||, V0 pushed from its nearest buffered code in angle (the
        gradient, sin(angle) / |V0|, fades as codes align: README). AuthorsReplayBuffer: its own loss.
    official: -log(mean_i d_i), d_i = min_j mean_k (V0_ik - R_jk)^2, no lambda: the authors' form
        (train.py), minus the log of a mean of squared distances, not Eq. 9's mean of log distances."""
    if isinstance(buffer, AuthorsReplayBuffer):
        return buffer.loss(v0)
    bank = buffer.codes()
    if bank.shape[0] == 0:
        return v0.sum() * 0.0
    with torch.autocast(v0.device.type, enabled=False):
        v0 = v0.float()
        if variant == "paper":
            v_star, _ = nearest_by_cosine(v0, bank)
            cos = F_nn.cosine_similarity(v0, v_star, dim=1)                   # (B,)
            return (cos + lambda_norm * v0.norm(dim=1)).mean()
        with torch.no_grad():                                                # nearest in L2, (B,)
            idx = torch.cdist(v0, bank, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
        dist = (v0 - bank[idx]).pow(2).mean(dim=1)                           # (B,): min_j, exact
        return -torch.log(dist.mean())


@torch.no_grad()
def health(v, mu, buffer):
    """Is D's code space alive (README, "The three scripts")? cos_nn: Eq. 8's cosine of each V with its
    nearest buffered code; cos_batch: the batch's mean pairwise cosine of mu (1.0000: D is in effect 1-D)."""
    u = F_nn.normalize(mu.detach().float(), dim=1)
    b = u.shape[0]
    out = {"cos_batch": ((u @ u.T).sum() - b) / max(b * (b - 1), 1)}
    if isinstance(buffer, ReplayBuffer) and len(buffer):
        v = v.detach().float()
        out["cos_nn"] = F_nn.cosine_similarity(v, nearest_by_cosine(v, buffer.codes())[0], dim=1).mean()
    return out


def entropy_weight(args, epoch):
    """sigma, or sigma * min(epoch / warm-up, 1) with --entropy-warmup (official: 100; 0 in epoch 0)."""
    if args.no_entropy:
        return 0.0
    if args.entropy_warmup > 0:
        return args.sigma * min(epoch / args.entropy_warmup, 1.0)
    return args.sigma


# ==================================================================================================
# 4. Manifold regularisation: DLLE (Eq. 12-13) and DIsoMap (Eq. 14)
# ==================================================================================================
# A function that draws randomness also takes the draw as an argument (a test feeds the authors').

def rotate(x, angle):
    """Each image of (B, C, H, W) turned by its angle (B,), radians counter-clockwise on screen."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    # affine_grid maps output to input pixels (x right, y down): the inverse of the turn on screen.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F_nn.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F_nn.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def dlle_noise_std(args, step):
    """F's noise std at G step `step`: --dlle-noise, or with --dlle-noise-anneal FROM TO (ours) linear
    from it at FROM * steps to 0 at TO * steps; a function of the step, as the lr (resume-safe)."""
    if args.dlle_noise_anneal is None:
        return args.dlle_noise
    start, end = (f * args.steps for f in args.dlle_noise_anneal)
    return args.dlle_noise * min(1.0, max(0.0, (end - step) / (end - start)))


def dlle_transform(x, args, D_plain=None, flip_dim=None, eps=None, std=None):
    """F(x) of Eq. 12, a "different view of x" (2-D points: the noise only):
    rot-noise  rotation by U(-rot_degrees, rot_degrees) (range ours) + N(0, std^2) (Suppl. CIFAR-10)
    noise      N(0, std^2) noise (Suppl. CelebA, AnimeFace, FFHQ)
    adv        one signed-gradient step of size std raising ||D(x + delta) - D(x)||^2 from a random
               start (Table 2's adversarial noise; the recipe is ours); the unwrapped D, SN not updated
    flip-noise Official code (data_aug): the batch flipped along height or width (one coin) + noise
    flip_dim / eps: the flip and the N(0, 1) draw, drawn if None; std: default --dlle-noise."""
    kind = args.dlle_transform
    std = args.dlle_noise if std is None else std
    images = x.dim() == 4
    if kind == "rot-noise" and images:
        angle = (torch.rand(x.shape[0], device=x.device) * 2 - 1) * math.radians(args.rot_degrees)
        x = rotate(x, angle)
    elif kind == "flip-noise" and images:
        flip_dim = 2 + int(torch.randint(0, 2, ()).item()) if flip_dim is None else flip_dim
        x = torch.flip(x, dims=[flip_dim])
    elif kind == "adv":
        was_training = D_plain.training
        D_plain.eval()                      # no spectral-norm power iteration for this probe
        with torch.enable_grad():
            delta = (std * torch.randn_like(x)).requires_grad_(True)
            target = embed(D_plain, x, sample=False).detach()
            gap = (embed(D_plain, x + delta, sample=False) - target).pow(2).sum()
            grad, = torch.autograd.grad(gap, delta)
        D_plain.train(was_training)
        return (x + std * grad.sign()).detach()
    eps = torch.randn_like(x) if eps is None else eps
    return x + std * eps


def dlle_loss(v, v_aug, variant="paper"):
    """paper (Eq. 12-13): E_{x ~ P_r, P_g} ||D(F(x)) - D(x)||_2, no stop-gradient (the paper states none).
    official: MSE(D(x), D(F(x)).detach()) (the caller sums it over real and fake). v, v_aug: independent
    draws of V: at F = identity ||v_aug - v|| ~ sqrt(2 sum exp(logvar)), so DLLE lowers D's logvar too."""
    if variant == "paper":
        return (v_aug - v).norm(dim=1).mean()
    return F_nn.mse_loss(v, v_aug.detach())


def isomap_mix(x_real, x_fake, variant="paper", a=None):
    """x^_ij = a x_i + (1 - a) x_j for the pairs (real_i, fake_i) (pairing real with fake: train.py);
    returns (x^, a (B, 1)). paper: a ~ U(0, 1) (no law in the paper; Official code: train.py at 59f6212),
    Eq. 14's "convex combination". official: a ~ N(0, 1), an extrapolation mostly (train.py at 2f18e97)."""
    if a is None:
        shape = (x_real.shape[0], 1)
        a = (torch.rand if variant == "paper" else torch.randn)(shape, device=x_real.device)
    a_x = a.view(-1, *([1] * (x_real.dim() - 1))).to(x_real.dtype)
    return a_x * x_real + (1 - a_x) * x_fake, a


def isomap_loss(v_mix, v_real, v_fake, a, variant="paper", noise=None):
    """paper (Eq. 14): 1 - cos(V_x^, V^), V^ = a V_i + (1 - a) V_j (Eq. 14 is the similarity; ours: 1 -
    it as a loss, mean over pairs; no stop-gradient, as the paper states none: D moves V_i, V_j too).
    official: MSE(V_x^, (a V_i + (1 - a) V_j + noise).detach()), noise ~ N(0, 0.05^2) (drawn if None)."""
    target = a * v_real + (1 - a) * v_fake                                     # (B, m)
    if variant == "paper":
        return (1 - F_nn.cosine_similarity(v_mix, target, dim=1)).mean()
    noise = 0.05 * torch.randn_like(target) if noise is None else noise
    return F_nn.mse_loss(v_mix, (target + noise).detach())


# ==================================================================================================
# 5. The two losses of a training step
# ==================================================================================================
# The objectives, every term on a fresh draw of V (embed; mu only in R1, adv's probe, logs and pictures):
#   D: min L_adv(V_x, V_G(z)) (Eq. 7; --loss) + w_iso L_Iso (Eq. 14, on a x + (1 - a) G(z)) + w_lle L_LLE
#        (Eq. 12-13, on x and G(z)) + sigma L_ent(V_x against the buffer of real codes)
#   G: min L_adv's G side (V_G(z)) + sigma L_ent(V_G(z) against the buffer of generated codes, lambda = 0)
# L_ent = cos(V0, V*) + lambda ||V0|| (Eq. 8), so D's ||V0|| weighs sigma * lambda (ours: sigma is in no
# equation); L_adv weighs 1, w_iso = w_lle = 1 (Official code: train.py). Who minimises L_ent the paper
# leaves open (Fig. 1): as train.py, D on real codes, G on generated ones (D cannot lower G's term); lambda
# on D only (ours, for Eq. 8's "stabilization of the discriminator"). --variant official: train.py's terms.

def d_step_loss(D, D_plain, x, fake, args, buffers, ent_w, dlle_std=None):
    """D's loss on real x and fake = G(z) (B, ...), G fixed (the block above). One forward of all
    inputs: one all-reduce, one SN power iteration (Official code: five); a BN D (pacgan) one per
    input. Returns (total, the terms and health figures for the log)."""
    variant = args.variant
    # ---- D's inputs, each (B, ...): real, fake, and the inputs of the terms switched on.
    inputs = {"real": x, "fake": fake}
    if not args.no_disomap:
        inputs["mix"], a = isomap_mix(x, fake, variant)                 # a x + (1 - a) G(z), Eq. 14
    if args.dlle_transform != "none":                                   # F(x), F(G(z)), Eq. 12
        inputs["real_aug"] = dlle_transform(x, args, D_plain, std=dlle_std)
        inputs["fake_aug"] = dlle_transform(fake, args, D_plain, std=dlle_std)
    if common.has_batch_norm(D):    # pacgan: a BN D sees each input on its own (PacGAN's model.py)
        v_all, mu_all = (torch.cat(t) for t in zip(*(embed(D, inp, with_mu=True) for inp in inputs.values())))
    else:
        with common.minibatch_parts(D, len(inputs)):      # StyleGAN2's minibatch std: per input
            v_all, mu_all = embed(D, torch.cat(list(inputs.values())), with_mu=True)   # (k B, m), k = 2..5
    v = dict(zip(inputs, v_all.split(x.shape[0])))                      # name -> code (B, m)

    # ---- the terms
    adv = "maf" if args.loss == "maf" else "adv"
    terms = {adv: adv_loss_d(v["real"], v["fake"], args.loss)}
    if "mix" in v:
        terms["iso"] = isomap_loss(v["mix"], v["real"], v["fake"], a, variant)
    if "real_aug" in v:
        if variant == "paper":                  # one mean over the real and fake samples
            terms["dlle"] = dlle_loss(torch.cat([v["real"], v["fake"]]), torch.cat([v["real_aug"], v["fake_aug"]]))
        else:                                   # Official code: an MSE for each, summed
            terms["dlle"] = dlle_loss(v["real"], v["real_aug"], "official") + dlle_loss(v["fake"], v["fake_aug"], "official")
    if not args.no_entropy:
        lam = args.lambda_norm if variant == "paper" else 0.0      # Official code: no lambda term
        terms["ent"] = entropy_loss(v["real"], buffers["real"], lam, variant)
    weights = {adv: 1.0, "iso": args.iso_weight, "dlle": args.dlle_weight, "ent": ent_w}
    total = sum(weights[k] * term for k, term in terms.items())

    # ---- apart from the loss: the health figures (log only); then the buffer takes the batch (always).
    figures = health(v["real"], mu_all[:x.shape[0]], buffers["real"])
    buffers["real"].push(v["real"])
    return total, dict(terms, **{"real_" + k: val for k, val in figures.items()})


def g_step_loss(D_plain, fake, args, buffers, ent_w):
    """G's loss: -L_MaF (Eq. 7; or --loss's) + sigma L_ent (Eq. 8, no lambda) of its samples' codes (H(P_g)
    up, Eq. 6); D_plain's gradients are zeroed before D's step. Returns (total, terms and health figures)."""
    v_fake, mu = embed(D_plain, fake, with_mu=True)
    adv = "g_maf" if args.loss == "maf" else "g_adv"
    terms = {adv: adv_loss_g(v_fake, args.loss)}
    if not args.no_entropy:
        terms["g_ent"] = entropy_loss(v_fake, buffers["fake"], 0.0, args.variant)
    weights = {adv: 1.0, "g_ent": ent_w}
    total = sum(weights[k] * term for k, term in terms.items())
    figures = health(v_fake, mu, buffers["fake"])       # log only, before the buffer takes the batch
    buffers["fake"].push(v_fake)
    return total, dict(terms, **{"fake_" + k: val for k, val in figures.items()})


def make_buffers(args, per_rank_batch, device):
    """Buffers of real codes (D's term) and generated codes (G's): FIFOs, empty (paper) or full of
    U(-1, 1) codes (official), or the authors' (--authors-buffer). Per rank, no all-gather (ours)."""
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    if args.authors_buffer:
        return {name: AuthorsReplayBuffer(args.buffer_size, per_rank_batch, args.m, device, gen) for name in ("real", "fake")}
    return {name: ReplayBuffer(args.buffer_size, args.m, device, args.variant == "official", gen) for name in ("real", "fake")}


# ==================================================================================================
# 6. Networks, sampling and pictures (Figure 3)
# ==================================================================================================

def build_networks(args, channels):
    """G: z -> x and D: x -> (mu, logvar) in R^{2m} (embed splits it); stylegan2: the config's, x width/64."""
    d_out = 1 if getattr(args, "scalar_head", False) else 2 * args.m
    if args.arch == "stylegan2":
        cfg, _ = stylegan2_preset(args.img_size)
        base, top = cfg["channel_base"] * args.width // 64, 512 * args.width // 64
        G = common.StyleGAN2Generator(args.z_dim, args.img_size, channels, channel_base=base, channel_max=top,
                                      n_mapping=cfg["n_mapping"], style_mixing=args.style_mixing)
        D = common.StyleGAN2Discriminator(args.img_size, channels, out_dim=d_out, channel_base=base,
                                          channel_max=top, mbstd_group=cfg["mbstd_group"])
        return G, D
    if args.arch == "pacgan":       # PacGAN's G and reduced BN D (no spectral norm), D's own width
        return (common.build_generator("pacgan", args.z_dim, 28, channels, width=args.width),
                common.build_discriminator("pacgan", 28, channels, width=args.d_width, out_dim=d_out))
    attn = tuple(getattr(args, "attn_res", None) or ())
    G = common.build_generator(args.arch, args.z_dim, args.img_size, channels, width=args.width, attention=attn)
    D = common.build_discriminator(args.arch, args.img_size, channels, width=args.width,
                                   out_dim=d_out, attention=attn, mlp_act=getattr(args, "d_act", "relu"))
    if args.arch == "mlp" and getattr(args, "d_spectral_norm", True):
        common.add_spectral_norm(D)         # ours (Eq. 10's Lipschitz D); the image Ds carry their own
    return G, D


# Samplers on batch statistics: BigGAN's G_ema in batches of 50, PacGAN's G in batches of 128.
BN_SAMPLING = {"biggan": True, "pacgan": common.PACGAN_BATCH}
# The StyleGAN2 resampling a checkpoint was trained with (official [1,3,3,1] FIR since issue 27).
SG2_RESAMPLING = "fir-1331"


def check_checkpoint(ckpt, args, path, resume=False):
    """Refuse, in one line, a checkpoint of an older maem_gan.py that this one cannot load (or resume)."""
    if args.arch == "stylegan2" and ckpt.get("sg2_resampling") != SG2_RESAMPLING:
        why = "its StyleGAN2 resampled bilinearly / by 2x2 average pooling, not with the official [1,3,3,1] filter"
    elif resume and args.arch == "mlp" and "d_spectral_norm" not in ckpt["args"]:
        why = "before --d-spectral-norm and --d-act; its 2-D presets differ"
    elif resume and set(ckpt["buffers"][0]) != {"real", "fake"}:
        why = f"its replay buffers are {sorted(ckpt['buffers'][0])}"
    else:
        return
    raise common.UsageError(f"{path} comes from an older maem_gan.py ({why}): start a new run")


@torch.no_grad()
def figure3(G, D, args, device, path, dims=4, top=5):
    """Fig. 3: per code dimension (mu; the first `dims`) its top `top` of --fig3-samples samples, a row
    each (running top-k); 2-D data: them in a colour per dimension over all samples (grey)."""
    G, D = common.unwrap(G), common.unwrap(D)
    g_mode, d_mode = G.training, D.training
    G.eval(), D.eval()
    gen = torch.Generator().manual_seed(args.seed + 3)
    dims = min(dims, args.m)
    best_v, best_x, seen = None, None, []
    for i in range(0, args.fig3_samples, 500):
        x = common.generate(G, min(500, args.fig3_samples - i), args.z_dim, device, generator=gen,
                            bn_batch=BN_SAMPLING.get(args.arch, False))
        v = embed(D, x.to(device), sample=False)[:, :dims].cpu()               # (b, dims)
        if args.arch == "mlp":
            seen.append(x)
        cand_v = v if best_v is None else torch.cat([best_v, v])               # (t, dims)
        cand_x = x if best_x is None else torch.cat([best_x, x])
        keep = torch.unique(cand_v.topk(min(top, len(cand_v)), dim=0).indices.flatten())
        best_v, best_x = cand_v[keep], cand_x[keep]
    G.train(g_mode), D.train(d_mode)
    rows = best_v.topk(min(top, len(best_v)), dim=0).indices.T                 # (dims, top)
    picks = best_x[rows.flatten()]
    if args.arch == "mlp":
        labels = torch.arange(dims).repeat_interleave(rows.shape[1]).numpy()
        centers, _ = common.synthetic_modes(args.data_name, args.data_std)
        common.plot_points([(torch.cat(seen).numpy(), common.REAL_COLOR), (picks.numpy(), labels)],
                           common.extent_for(args.data_name), size=400, centers=centers,
                           title=f"top-{top} samples of code dims 1-{dims} (colour = dim)").save(path)
    else:
        common.save_image_grid(picks, path, nrow=rows.shape[1])


@torch.no_grad()
def save_samples(G, args, z_fixed, real_points, path):
    """A picture from a fixed z, no training RNG: an 8x8 grid, or 2-D samples (red) over data (grey)."""
    G = common.unwrap(G)
    mode = G.training
    G.eval()
    # StyleGAN2's noise inputs fixed too (a draw would move the training RNG)
    with common.batch_norm_from_batch(G) if args.arch in BN_SAMPLING else contextlib.nullcontext():
        fake = G(z_fixed, **({"noise_mode": "const"} if args.arch == "stylegan2" else {})).float().cpu()
    G.train(mode)
    if args.arch == "mlp":
        centers, _ = common.synthetic_modes(args.data_name, args.data_std)
        common.plot_points([(real_points.numpy(), common.REAL_COLOR), (fake.numpy(), common.FAKE_COLOR)],
                           common.extent_for(args.data_name), size=400, centers=centers,
                           title="samples G(z) (red), data (grey)").save(path)
    else:
        common.save_image_grid(fake[:64], path, nrow=8)


def load_sampler(ckpt_path, device="cpu"):
    """For evaluate.py: n -> n samples of the checkpoint's G in [-1, 1]; .dataset is common.py's name."""
    ckpt = common.load_checkpoint(ckpt_path, method=METHOD)
    args = argparse.Namespace(**ckpt["args"])
    check_checkpoint(ckpt, args, ckpt_path)
    channels = common.DATASETS[args.data_name]["channels"]
    G = common.load_generator(build_networks(args, channels)[0], ckpt, ckpt_path, device)

    def sample(n):
        return common.generate(G, n, args.z_dim, device, bn_batch=BN_SAMPLING.get(args.arch, False))

    sample.dataset = args.data_name
    sample.data_std = args.data_std
    return sample


# ==================================================================================================
# 7. Training
# ==================================================================================================

def learning_rate(args, epoch, step=0):
    """Suppl.: lr x lr_decay every lr_decay_epochs epochs (official: StepLR(50, 0.9)), times the linear
    decay after --lr-decay-from (ours, common.lr_factor); from epoch and step alone (resume-safe)."""
    return (args.lr * args.lr_decay ** (epoch // args.lr_decay_epochs)
            * common.lr_factor(step, args.steps, getattr(args, "lr_decay_from", 1.0)))


def make_optimizers(args, G, D):
    """Adam for G and D; a lazy regulariser every k steps scales lr by c = k / (k + 1) and betas to
    beta^c (StyleGAN2, App. B; c = 1 without one: ours). Returns (opt_g, opt_d, c_g, c_d)."""
    c_d = args.r1_every / (args.r1_every + 1) if args.r1_gamma > 0 else 1.0
    c_g = args.pl_every / (args.pl_every + 1) if args.pl_weight > 0 else 1.0
    opt_g = common.adam(G.parameters(), lr=args.lr * c_g, betas=(args.beta1 ** c_g, args.beta2 ** c_g))
    opt_d = common.adam(D.parameters(), lr=common.d_lr(args) * c_d, betas=(args.beta1 ** c_d, args.beta2 ** c_d))
    return opt_g, opt_d, c_g, c_d


def restore_buffers(ckpt, buffers, pl_mean, rt):
    """A resumed run's per-process replay buffers and path-length mean (afresh on another world size)."""
    saved = ckpt["buffers"]
    if len(saved) == rt.world_size:
        for name, buf in buffers.items():
            buf.load_state_dict(saved[rt.rank][name])
        pl_mean.copy_(ckpt["pl_mean"][rt.rank])
    elif rt.is_main:
        print(f"note: the checkpoint's replay buffers are of {len(saved)} process(es): they start afresh")


def train(args, rt, dataset):
    is_points = common.DATASETS[args.data_name]["kind"] == "points"
    stream = common.BatchStream(dataset, args.batch_size, rt, seed=args.seed, num_workers=args.num_workers)
    # Same seed on every rank -> identical initial weights; then per-rank noise streams.
    G, D = build_networks(args, common.DATASETS[args.data_name]["channels"])
    common.seed_rank(rt, args.seed)
    G, D = rt.wrap(G), rt.wrap(D)
    D_plain = common.unwrap(D)          # D inside G's loss and the adv probe: no DDP gradient sync
    opt_g, opt_d, c_g, c_d = make_optimizers(args, G, D)
    per_rank = args.batch_size // rt.world_size
    buffers = make_buffers(args, per_rank, rt.device)
    ema = common.EMA(G, args.ema).to(rt.device) if args.ema > 0 else None
    pl_mean = torch.zeros((), device=rt.device)         # path-length running mean (per process)

    ckpt_path = os.path.join(args.out, "ckpt.pt")
    nets, opts = {"G": G, "D": D, "G_ema": ema}, {"opt_g": opt_g, "opt_d": opt_d}
    ckpt, step = common.resume_checkpoint(ckpt_path, args, METHOD), 0
    if ckpt is not None:
        check_checkpoint(ckpt, args, ckpt_path, resume=True)
        step = common.restore_training_state(ckpt, nets, opts, rt, stream, args.seed, ckpt_path)
        restore_buffers(ckpt, buffers, pl_mean, rt)

    log = common.Logger(args.out, rt.is_main, args.steps, start_step=step)
    meter = common.LossMeter(rt)
    off = {"DIsoMap": args.no_disomap, "DLLE": args.dlle_transform == "none", "RB-MaEM": args.no_entropy}
    log.info(f"MaEM-GAN ({args.variant}) on {args.dataset}: {args.steps} steps, global batch {args.batch_size} on "
             f"{rt.world_size} process(es), {rt.device}, m={args.m}, {args.arch}, loss {args.loss}, terms "
             f"{' '.join(k for k, v in off.items() if not v)}, sigma={args.sigma}, lambda={args.lambda_norm}, EMA "
             f"{args.ema}, R1 {args.r1_gamma}, path length {args.pl_weight}, F={args.dlle_transform}, buffer "
             f"{args.buffer_size}, seed {args.seed}; G {common.count_params(G)} / D {common.count_params(D)} params")
    # Progress pictures: a fixed z (and for 2-D data a fixed subset of the data), no training RNG.
    z_fixed = common.fixed_noise(2000 if is_points else 64, args.z_dim, rt.device, seed=args.seed + 1)
    real_points = dataset.points[common.seeded_subset(len(dataset), 2000)] if is_points else None

    # Ctrl-C / SIGTERM: stop after this step, saved; a checkpoint at the last step; timing.
    run = common.RunControl(rt, args, step, meter, ckpt)
    while run.going(step):
        # The epoch the next batch comes from (the stream only turns the epoch when it runs dry).
        epoch = stream.epoch + (stream.pos >= stream.steps_per_epoch)
        lr = learning_rate(args, epoch, step)
        for opt, c in ((opt_g, c_g), (opt_d, c_d * common.d_lr(args) / args.lr)):
            common.set_lr([opt], lr * c)
        ent_w = entropy_weight(args, epoch)

        # ---- D step(s), G fixed: min_D d_step_loss (the objectives: section 5).
        for i in range(args.n_critic):
            x, _ = next(stream)
            if args.hflip and x.dim() == 4:
                # Official code: transform_train's RandomHorizontalFlip, one coin per image.
                flip = torch.rand(x.shape[0], device=x.device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            z = torch.randn(per_rank, args.z_dim, device=rt.device)
            with rt.autocast():
                with torch.no_grad():
                    fake = G(z).to(x.dtype)
                d_loss, d_terms = d_step_loss(D, D_plain, x, fake, args, buffers, ent_w, dlle_noise_std(args, step))
            opt_d.zero_grad(set_to_none=True)
            rt.backward_step(d_loss, opt_d)
            if args.r1_gamma > 0 and (step * args.n_critic + i) % args.r1_every == 0:
                # Official code (stylegan2-ada-pytorch loss.py, 'Dreg'): its own step, weight gamma/2 x k.
                with rt.autocast():
                    r1 = r1_loss(D, x)
                opt_d.zero_grad(set_to_none=True)
                rt.backward_step(r1 * (args.r1_gamma / 2 * args.r1_every), opt_d)
                d_terms["r1"] = r1.detach()

        # ---- G step: min_G g_step_loss, after the n_critic D steps. Official code:
        # after the first of them, on its z; here the last D step's z (official) or a fresh one (paper).
        if args.variant == "paper":
            z = torch.randn(per_rank, args.z_dim, device=rt.device)
        with rt.autocast():
            g_loss, g_terms = g_step_loss(D_plain, G(z), args, buffers, ent_w)
        opt_g.zero_grad(set_to_none=True)
        rt.backward_step(g_loss, opt_g)
        if args.pl_weight > 0 and step % args.pl_every == 0:
            # Official code ('Greg'): half the batch (pl_batch_shrink 2), weight pl_weight x k; via DDP.
            z_pl = torch.randn(max(per_rank // 2, 1), args.z_dim, device=rt.device)
            with rt.autocast():
                pl, g_terms["pl_length"] = common.path_length_penalty(G, z_pl, pl_mean)
            opt_g.zero_grad(set_to_none=True)
            rt.backward_step(pl * (args.pl_weight * args.pl_every), opt_g)
            g_terms["pl"] = pl.detach()
        step += 1
        if ema is not None:
            ema.step(G, step, args.ema_start)       # a copy until ema_start, the average after
        meter.add(d_loss=d_loss, g_loss=g_loss, **d_terms, **g_terms)

        # ---- logging / checks / pictures / checkpoint (main process writes)
        if step % args.log_every == 0 or step == args.steps:
            common.log_step(meter, log, step, ckpt_path, lr=lr, ent_w=ent_w)
        if rt.is_main and (step % args.sample_every == 0 or step == args.steps):
            save_samples(ema.shadow if ema is not None else G, args, z_fixed, real_points,
                         os.path.join(args.out, "samples", f"step_{step:07d}.png"))
        if run.checkpoint_due(step):                           # collective: every rank calls it
            buffer_states = common.gather_per_rank(rt, {k: b.state_dict() for k, b in buffers.items()})
            common.save_training_state(ckpt_path, METHOD, args, step, nets, opts, rt, stream, buffers=buffer_states,
                                       pl_mean=common.gather_per_rank(rt, pl_mean.cpu()),
                                       sg2_resampling=SG2_RESAMPLING, **run.state())
    run.end(step)
    return (ema.shadow if ema is not None else G), D


@torch.no_grad()
def code_directions(D, args, device, per_mode=200):
    """2-D health check of the final D: the mean / max pairwise cosine of the modes' mean codes mu
    (near 1: one direction for all); centred: without the realness direction (1, ..., 1)."""
    D = common.unwrap(D).eval()
    centers, std = common.synthetic_modes(args.data_name, args.data_std)
    gen = torch.Generator().manual_seed(args.seed + 5)
    c = torch.as_tensor(centers, dtype=torch.float32)                            # (K, 2)
    pts = c.repeat_interleave(per_mode, 0) + std * torch.randn(len(c) * per_mode, 2, generator=gen)
    mu = embed(D, pts.to(device), sample=False).cpu().view(len(c), per_mode, -1).mean(1)   # (K, m)
    off = ~torch.eye(len(c), dtype=torch.bool)
    u = F_nn.normalize(mu, dim=1)
    cos = (u @ u.T)[off]
    w = F_nn.normalize(mu - mu.mean(dim=1, keepdim=True), dim=1)
    cos_c = (w @ w.T)[off]
    # Directions the mode codes vary in: (sum l)^2 / sum l^2 of their covariance's eigenvalues l.
    lam = torch.linalg.eigvalsh(torch.cov(mu.T.double())).clamp_min(0)
    dims = (lam.sum() ** 2 / (lam ** 2).sum().clamp_min(1e-300)).item()
    return {"code_cos_modes_mean": round(cos.mean().item(), 4), "code_cos_modes_max": round(cos.max().item(), 4),
            "code_cos_modes_centred_mean": round(cos_c.mean().item(), 4), "code_dims": round(dims, 2)}


def final_metrics(G, D, args, rt):
    """metrics.json: 2-D modes and code directions; stacked modes (--classifier); FID, IS, I-Variance."""
    G = common.unwrap(G).eval()          # BN's running statistics, as the official test()

    def draw(n):
        return common.generate(G, n, args.z_dim, rt.device, bn_batch=BN_SAMPLING.get(args.arch, False))

    if common.DATASETS[args.data_name]["kind"] == "points":           # no code directions with --scalar-head
        metrics = common.run_points_metrics(draw, args, rt.device, args.data_name)
        return dict(metrics, **(code_directions(D, args, rt.device) if args.m > 1 else {}))
    if args.data_name.startswith("stacked"):
        if not args.classifier:
            print("note: mode metrics skipped: pass --classifier (train one with `python evaluate.py "
                  "classifier --dataset fashion-mnist --out FILE`)", flush=True)
            return {"skipped": "no --classifier"}
        return common.run_stacked_metrics(draw, args, rt.device, args.data_name)
    # Against the images the run trains on (its preset's split: train.py's train+test on CIFAR-10).
    return common.run_image_metrics(draw, args, ["fid", "is", "ivar"], rt.device, args.data_name, args.split)


def main(argv=None):
    args = common.restore_saved_args(parse_args(argv), METHOD, RUN_CONTROL)
    rt = common.setup_runtime(args.device, args.amp, args.seed, args.compile, args.threads)
    # The data first: a missing or broken dataset stops the run before anything is written.
    dataset = common.build_dataset(args.data_name, root=args.data_root, split=args.split, img_size=args.img_size,
                                   download=args.download, data_std=args.data_std, redraw=bool(args.redraw))
    common.prepare_out_dir(args.out, args, args.resume, rt.is_main)
    start = time.perf_counter()
    G, D = train(args, rt, dataset)
    if rt.is_main:
        figure3(G, D, args, rt.device, os.path.join(args.out, "figure3.png"))
        with common.metric_precision():          # no TF32 / cuDNN autotuning for metrics, as evaluate.py
            metrics = final_metrics(G, D, args, rt)
        common.finish_run(rt, args, metrics, start)
    common.shutdown(rt)


if __name__ == "__main__":
    common.run_cli(main)
