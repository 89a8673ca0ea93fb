"""PGMGAN: Partition-Guided Mixture of GANs, all three stages (pretext, partition, GAN).

Paper: Armandpour, Sadeghian, Li, Zhou, "Partition-Guided GANs", CVPR 2021
(arXiv:2104.00816; text in ../shared/papers/pgm_gan.txt). Official code: alisadeghian/PGMGAN.
Where this file follows the official code instead of the paper, the comment says `Official code:`.

The idea in three lines:
  * Learn a space partitioner S(x) = softmax(W phi(x)) without labels: SimCLR features (Eq. 4),
    a k-nearest-neighbour graph on them, and a clustering loss over the graph (Eq. 5).
  * Train one generator / discriminator pair per partition A_i on the data of A_i (Eq. 2); here
    one class-conditional pair whose class is the partition id stands for the k pairs.
  * Guide each G_i into its own partition with R_i(x) = sum_c (f_c(x) - f_i(x))_+ on S's logits
    (Eq. 6, 8). phi is a residual network with Lipschitz-bounded branches (Theorem 3), so R_i has
    no local minima outside A_i and the partitions are connected; keep only samples with R_i = 0.

Stages (`--stage`, default all), each writing what the next one reads into --out (--resume skips
finished stages and continues the pretext and the GAN bit-for-bit from pretext.pt / ckpt.pt, where
Ctrl-C or SIGTERM saved them; a cut-off partition stage starts again):
    pretext    SimCLR on the training images (Eq. 4; not for 2-D data, --partition random, --k 1) -> pretext.pt
    partition  kNN graph on the pretext features + S trained with Eq. 5  -> partition.pt
    gan        the mixture of GANs with the guide                        -> ckpt.pt, metrics.json

Defaults that differ from the paper:
  * Image presets (not --arch pacgan): the hinge loss instead of Eq. 2 / 8's log loss (Official code:
    configs/*/scan_guide*.yaml, gan_type hinge; --loss standard for Eq. 2).
  * Image presets: R_i averaged over c instead of Eq. 6's sum, with lambda 6.0 (Official code:
    clusterers/scan_selflabel_guide.py label_guide, configs' weight_guide 6.0): in Eq. 6's units
    lambda = 6/k, 0.03 at k = 200 (--guide-reduce sum --guide-weight 0.03: the same loss).
  * Image Gs: per-partition conditional-BN gains and biases in every block instead of sharing all
    weights but the input layer (Sec. 4; Official code: BigGAN G with G_shared false; build_gan).
  * Eq. 5 with means instead of sums and SCAN's weights alpha 0, beta 5 (the paper gives none; SCAN's
    scan_cifar10.yml, whose code trained the authors' partitioners; partition_loss).
  * G's standard loss is the non-saturating -log D(G(z)), not Eq. 8's log(1 - D(G(z))) (ours; g_loss_fn).

Launch:
    python pgm_gan.py --dataset grid                                   # 2-D, all stages (CPU, ~12 min)
    python pgm_gan.py --dataset grid --partition random                # baseline "Random Partition ID"
    python pgm_gan.py --dataset grid --guide-weight 0                  # baseline "Partition GAN"
    python pgm_gan.py --dataset grid --k 1                             # baseline: one plain GAN
    python pgm_gan.py --dataset grid --partitioner unconstrained       # Sec. 5.1 ablation (Fig. 3-4 right)
    python pgm_gan.py --dataset cifar10 --data-root data/cifar10 --download   # one GPU
    python pgm_gan.py --dataset cifar10 --stage pretext                # the stages one by one ...
    python pgm_gan.py --dataset cifar10 --stage partition              # ... (same --out)
    python pgm_gan.py --dataset cifar10 --stage gan
    torchrun --standalone --nproc_per_node=8 pgm_gan.py --dataset stl10        # one node
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 pgm_gan.py --dataset imagenet --data-root /data/imagenet/train
    python pgm_gan.py --dataset grid --out runs/x --resume             # continue a run
    python evaluate.py ckpt runs/pgm_gan-grid-0/ckpt.pt --n 50000      # evaluate (with rejection)

Map of the paper to this file:
    Eq. 2   per-partition GAN objective V(D_i, G_i, A_i)  -> d_loss_fn / g_loss_fn (`--loss standard`)
            (default: hinge loss, as the official code)
    Eq. 4   NT-Xent contrastive loss (SimCLR)             -> run_pretext (common.nt_xent, train_simclr)
    Eq. 5   partitioner objective on the kNN graph        -> partition_loss, run_partition (common.knn_graph)
    Sec. 4.1 S_init = softmax(W_0 phi_0(x)) from pretext  -> Partitioner, run_partition
    Eq. 6   guide R_i(x) = sum_c (f_c(x) - f_i(x))_+      -> guide
    Eq. 7   R_i(x) = 0 <=> x in A_i                       -> guide, make_sampler (rejection)
    Eq. 8   G_i's loss + lambda * mean R_i, lambda annealed -> guide_weight, run_gan
    Thm. 3 / Sec. 4.2 residual blocks x + psi(x), psi with spectral norm L < 1 and ELU
                                                          -> LipschitzLayer, ResidualBlock, Partitioner
    Fig. 3  -R_i over the plane                           -> figure3
    Fig. 4  real vs generated 2-D points                  -> figure4
    Table 1 modes / reverse KL (stacked), FID / IS        -> final_metrics
    (ours)  partition NMI / accuracy / purity (no table)  -> run_partition (common.clustering_metrics)
"""

import argparse
import collections
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

METHOD = "pgm_gan"
STAGES = ("pretext", "partition", "gan", "all")
# Flags a --resume may change, beyond the shared ones: which stage to run and the evaluation
# classifier (neither changes the experiment).
RUN_CONTROL = common.RUN_CONTROL + ("stage", "classifier")

# ==================================================================================================
# 1. Arguments and per-dataset presets
# ==================================================================================================

# Flags that default to None are filled from PRESETS[dataset] unless given on the command line.
# Sources: "paper" = the PGMGAN paper; "Official code:" = alisadeghian/PGMGAN (2d_mix/train.py for
# 2-D, train.py + configs/<dataset>/*.yaml for images); "SCAN" = wvangansbeke/Unsupervised-
# Classification (configs/pretext/simclr_cifar10.yml, configs/scan/scan_cifar10.yml), whose code
# trained the authors' partitioners (their repository only loads them); "ours" = none of them.
# How the 2-D values were measured: README, "How the 2-D defaults were chosen".
_TOY = dict(
    # Official code 2d_mix/train.py: batch 100, z 2, D width 200 (d_act_dim), d_iter 1, standard
    # loss, maxout D (5 pieces), 50K evaluation samples. Ours: 8K steps (its 100K do not fit a CPU),
    # Adam lr 1e-3, betas (0.5, 0.999), decaying over the second half (theirs, from Self-Conditioned
    # GAN's 2d_mix/config.py: 1e-4, (0.8, 0.999), constant), maxout kept (README, "How the 2-D
    # defaults were chosen"), G of width 200 too, k = one partition per Gaussian (inferred from
    # Sec. 5.1, where S puts each Gaussian in its own cluster; their script fits 50 k-means
    # clusters; no mode count known: --k's help).
    arch="mlp", width=200, z_dim=2, batch_size=100, steps=8_000, lr=1e-3, beta1=0.5, beta2=0.999,
    n_dis=1, loss="standard", d_act="maxout", lr_decay_from=0.5, eval_samples=50_000,
    # Guide: ours (their reg_guide defaults to 0 and 2d_mix/run.sh passes none): R summed over c with
    # lambda 1.0, where the official R is a mean; both units: --guide-reduce's help.
    guide_weight=1.0, guide_anneal=5e-5, guide_min=0.0, guide_reduce="sum", ema=0.0, ema_start=0,
    # Partitioner: Sec. 5.1 (no pretext, S on the coordinates); official: fit on 10K points. Size,
    # steps, lr, 3 restarts (best Eq. 5 on the whole graph), and Eq. 5's alpha 0 / beta 5: ours, SCAN's
    # image values carried over (the official 2-D S is instead fit by cross-entropy to k-means labels).
    part_blocks=4, part_width=64, part_levels=0, part_steps=1500, part_batch_size=512,
    part_lr=3e-3, part_restarts=3, part_samples=10_000, neighbors=20, alpha=0.0, beta=5.0,
    pretext_steps=0, pretext_batch_size=256, pretext_lr=0.4, temperature=0.1,
    log_every=500, sample_every=2000, ckpt_every=2000)
_IMAGES = dict(
    # GAN. Sec. 5: SN-GAN networks, k = 200. Official code (configs/*/scan_guide*_biggan*.yaml,
    # train.py): z 128, batch 100, Adam 2e-4 betas (0, 0.999), hinge loss, G every 4th D step
    # (train.py: `it % 4`), lambda 6.0 minus 1.2e-4 per G step with R averaged over c (mean).
    # Sec. 5.4 / Table 4 keep lambda 6.0 for every k (on Eq. 6's sum; 6.0 on the mean = 6/k on it).
    # That the paper's 6.0 was the mean's, as only the mean keeps lambda k-independent, is our argument.
    # No weight averaging: take_model_average is false (configs/cifar|stl10/default.yaml) and
    # the `biggan: ema` keys only reach the BigGAN constructor's unused **kwargs. Steps: ours.
    arch="resnet", width=64, z_dim=128, batch_size=100, steps=60_000, lr=2e-4, beta1=0.0,
    beta2=0.999, n_dis=4, loss="hinge", k=200, guide_weight=6.0, guide_anneal=1.2e-4,
    guide_min=0.0, guide_reduce="mean", ema=0.0, ema_start=10_000, lr_decay_from=1.0,
    eval_samples=50_000,         # Sec. 5; official configs/default.yaml training.inception_nsamples
    # Partitioner. Sec. 5: 20 residual blocks of 3 convs, Lipschitz 0.9. Levels 3 and width 128:
    # ours (official i-ResNet: 2 squeezes, widths 32/64/128; see Partitioner). SCAN: Adam 1e-4,
    # batch 128, 50 epochs (~20K steps), 20 neighbours, entropy weight 5 (alpha 0).
    part_blocks=20, part_width=128, part_levels=3, part_steps=20_000, part_batch_size=128,
    part_lr=1e-4, part_restarts=1, part_samples=None, neighbors=20, alpha=0.0, beta=5.0,
    # Pretext. SCAN simclr_cifar10.yml: 500 epochs of 512 (~49K steps on 50K images), SGD lr 0.4,
    # momentum 0.9 (no Nesterov), weight decay 1e-4, cosine to 1e-3 x lr, temperature 0.1.
    pretext_steps=49_000, pretext_batch_size=512, pretext_lr=0.4, temperature=0.1,
    log_every=200, sample_every=5000, ckpt_every=5000)
_PACGAN = dict(
    # PacGAN's stacked-MNIST protocol (tests/bench_pacgan.py), fjxmlzn/PacGAN D=0.25G config.py:
    # batch 128, z 256, Adam betas (0.5, 0.99), lr 1e-4 for G and 2e-4 for D, 500K iterations,
    # 25,600 counted samples; model.py: common.PacGANGenerator (here with per-partition BN) and
    # PacGANDiscriminator (width 2 = 1/4 of G; BN, no spectral norm) with k per-partition outputs,
    # BCE with the non-saturating G loss (--loss standard, not PGMGAN's hinge) and one D step per G
    # step (not PGMGAN's 4); these replace its batch 100, z 128, betas (0, 0.999) and lr 2e-4 for G.
    # Data drawn afresh every epoch (redraw, common.StackedDataset). The G step draws a fresh z
    # (PacGAN reuses the D step's).
    # PGMGAN's own: k = 200 (Table 1, stacked MNIST), the guide of the stacked-mnist preset (mean,
    # 6.0 - 1.2e-4 per step, floor 1e-4). Stages sized for one CPU core (ours, ~10 minutes beside a
    # GAN stage of ~1 h): SimCLR 1000 steps of batch 256 (SCAN: ~49K of 512) on a 2-block width-16
    # partitioner with 2 squeezes (Sec. 5: 20 blocks of width 128 cost seconds per step on a CPU),
    # kNN graph of 20K training images (10 neighbours, official stacked config), S trained 1000
    # steps of batch 128 at lr 1e-3 (SCAN: 20K steps at 1e-4; 10x the lr for 20x fewer steps).
    arch="pacgan", img_size=28, width=8, d_width=2, z_dim=256, batch_size=128, steps=500_000,
    lr=1e-4, lr_d=2e-4, beta1=0.5, beta2=0.99, n_dis=1, loss="standard", k=200, guide_weight=6.0,
    guide_anneal=1.2e-4, guide_min=1e-4, guide_reduce="mean", ema=0.0, ema_start=0, lr_decay_from=1.0,
    eval_samples=25_600, redraw=True,
    part_blocks=2, part_width=16, part_levels=2, part_steps=1000, part_batch_size=128, part_lr=1e-3,
    part_restarts=1, part_samples=20_000, neighbors=10, alpha=0.0, beta=5.0,
    pretext_steps=1000, pretext_batch_size=256, pretext_lr=0.4, temperature=0.1,
    log_every=500, sample_every=5000, ckpt_every=5000)
PRESETS = {
    # PacGAN's Table 3 benchmark (_PACGAN), keyed (dataset, arch): --arch pacgan.
    ("stacked-mnist", "pacgan"): _PACGAN,
    ("stacked-fashion-mnist", "pacgan"): _PACGAN,
    "grid": dict(_TOY, k=25),
    "ring": dict(_TOY, k=8),
    # Official code configs/stacked_mnist/scan_guide97_biggan_D4.yaml (guided; its twin
    # scan_guide98, weight_guide 0, is the Partition GAN row = --guide-weight 0): 10 neighbours,
    # floor 1e-4, "nepochs = 350" (~52K G steps; 50K here is our rounding).
    # eval_samples: PacGAN's 25,600, as every stacked count (common.STACKED_SAMPLES; PGMGAN: 50K).
    "stacked-mnist": dict(_IMAGES, neighbors=10, guide_min=1e-4, steps=50_000,
                          eval_samples=common.STACKED_SAMPLES),
    "stacked-fashion-mnist": dict(_IMAGES, neighbors=10, guide_min=1e-4, steps=50_000,
                                  eval_samples=common.STACKED_SAMPLES),
    # Official code configs/cifar/scan_guide_biggan.yaml (floor 0).
    "cifar10": dict(_IMAGES),
    # Official code configs/stl10/scan_guide101_biggan_D4.yaml (guided; twin 102 = weight 0):
    # 48x48, floor 1e-4. Steps ours.
    "stl10": dict(_IMAGES, guide_min=1e-4, steps=100_000),
    # Sec. 5.3: 128x128, k = 1000, BigGAN (here the SNGAN ResNet 128 of common.py, ours); no
    # official config: the CIFAR guide (mean, 6.0); batch 256 ours.
    "imagenet": dict(_IMAGES, k=1000, batch_size=256, steps=100_000),
}
# One line per preset for --help: where its values come from.
PRESET_SOURCES = {
    "grid": "Sec. 5.1 (25 Gaussians, one cluster each: k = 25 inferred) + official 2d_mix/train.py (batch "
            "100, z 2, width 200, maxout D, standard loss); steps, lr, guide (sum, 1.0) and partitioner size ours",
    "ring": "as grid, k = 8 inferred alike (Sec. 5 names a 2D-ring, results in its appendix, absent from our "
            "text; 8 Gaussians: official 2d_mix/inputs.py get_data_ring)",
    "stacked-mnist": "Table 1 + official configs/stacked_mnist/scan_guide97_biggan_D4.yaml (guide "
                     "mean 6.0); pretext/partition training from SCAN's configs",
    "stacked-fashion-mnist": "ours: the stacked-mnist preset on Fashion-MNIST",
    "cifar10": "Table 1 + official configs/cifar/scan_guide_biggan.yaml (guide mean 6.0); SCAN's configs",
    "stl10": "Table 2 (48x48) + official configs/stl10/scan_guide101_biggan_D4.yaml (guide mean 6.0); "
             "SCAN's configs",
    "imagenet": "Sec. 5.3 (128x128, k 1000; BigGAN replaced by the SNGAN ResNet 128, ours)",
    ("stacked-mnist", "pacgan"): "PacGAN D=0.25G config.py / model.py (batch 128, z 256, lr G 1e-4 D 2e-4, "
                                 "betas 0.5/0.99, BCE, 1 D step) + Table 1's k 200; stages sized for a CPU, ours",
    ("stacked-fashion-mnist", "pacgan"): "as stacked-mnist --arch pacgan (PacGAN's protocol on Fashion-MNIST, ours)",
}

SHORT_RUN = """\
A short run: --steps sets the GAN stage only. Each stage has its own size: pretext
--pretext-steps, --pretext-batch-size; partition --part-samples (images embedded, put in the kNN
graph), --part-steps, --part-batch-size, --part-restarts, --pi-samples (images labelled to measure
pi); GAN --steps, --batch-size,
--n-dis; metrics --eval-samples. The image presets' networks (a 20-block partitioner, the SN-GAN
ResNet) cost seconds per step on a CPU: shrink them too (--part-blocks, --part-width, --width).
A CPU check of stacked Fashion-MNIST in a few minutes:
  --steps 20 --batch-size 16 --pretext-steps 5 --pretext-batch-size 32 --part-samples 2000
  --part-steps 20 --part-batch-size 64 --pi-samples 2000 --part-blocks 4 --part-width 32 --width 32
  --eval-samples 500"""

# --dataset names of this script -> common.DATASETS names ("imagenet" is a folder of images).
DATA_NAME = {"imagenet": "folder"}
IMG_SIZE = {"imagenet": 128}


def preset_for(args):
    """PRESETS[(dataset, "pacgan")] with --arch pacgan (stacked data at 28x28 only), else PRESETS[dataset]."""
    if args.arch != "pacgan":
        return PRESETS[args.dataset]
    common.check_pacgan(args.dataset, args.img_size or 28)
    return PRESETS[(args.dataset, "pacgan")]


def parse_args(argv=None):
    p = common.ArgParser(description=__doc__.split("\n\n")[0] + "\n\n" + SHORT_RUN,
                         formatter_class=common.PresetHelpFormatter,
                         epilog=common.presets_epilog(PRESETS, PRESET_SOURCES))
    p.add_argument("--dataset", required=True, choices=sorted(k for k in PRESETS if isinstance(k, str)),
                   help="grid (Sec. 5.1), ring (named in Sec. 5), stacked-mnist (Table 1), "
                        "stacked-fashion-mnist (ours), cifar10 (Table 1), stl10 48x48 (Table 2), "
                        "imagenet 128x128 folder (Table 3)")
    p.add_argument("--stage", default="all", choices=STAGES, help="which stage(s) to run")
    g = p.add_argument_group("partitions (Sec. 4.1) and baselines (Sec. 5.2)")
    g.add_argument("--k", type=int, default=None,
                   help="number of partitions = generators (200 images, Sec. 5.2; 1000 ImageNet, "
                        "Sec. 5.3; 2-D presets: one per Gaussian as inferred from Sec. 5.1, 25 grid / 8 ring; "
                        "the official 2d_mix script uses 50); --k 1 = one plain GAN (baseline). Modes unknown: "
                        "run --stage partition --k 50 (an --out of its own), then use --k near the exp(H(pi)) of "
                        "the partition sizes it prints (ring 8.0-8.5, grid 25.4-26.6 for 8 and 25 modes, 3 seeds "
                        "each: README, 'PGMGAN on 2-D data')")
    g.add_argument("--partition", default="learned", choices=["learned", "random"],
                   help="learned: S from Eq. 5; random: uniformly random partition ids "
                        "(baseline 'Random Partition ID', Table 1; no guide, no rejection)")
    g = p.add_argument_group("pretext: SimCLR (Eq. 4)")
    g.add_argument("--pretext-steps", type=int, default=None, help="SGD steps (SCAN: 500 epochs)")
    g.add_argument("--pretext-batch-size", type=int, default=None, help="global batch (SCAN: 512)")
    g.add_argument("--pretext-lr", type=float, default=None, help="SGD lr, cosine decay (SCAN: 0.4)")
    g.add_argument("--temperature", type=float, default=None, help="tau of Eq. 4 (SCAN: 0.1)")
    g.add_argument("--proj-dim", type=int, default=128, help="dimension of h (SimCLR: 128)")
    common.add_simclr_args(g)
    g = p.add_argument_group("partitioner S = softmax(W phi(x)) (Eq. 5, Thm. 3)")
    g.add_argument("--neighbors", type=int, default=None,
                   help="neighbours per point in the kNN graph (SCAN: 20; official stacked MNIST: 10)")
    g.add_argument("--alpha", type=float, default=None, help="weight of sum_i H(S(x_i)) in Eq. 5 (SCAN: 0; at 0 "
                   "nothing but the neighbour term sharpens each S(x_i): above the mode count S can stay undecided)")
    g.add_argument("--beta", type=float, default=None, help="weight of H(mean S) in Eq. 5 (SCAN: 5)")
    g.add_argument("--partitioner", default="lipschitz", choices=["lipschitz", "unconstrained"],
                   help="lipschitz: residual blocks with bounded branches (Sec. 4.2, Thm. 3); "
                        "unconstrained: a plain ReLU MLP, the ablation of Sec. 5.1 / Fig. 3-4 (2-D only)")
    g.add_argument("--lipschitz", type=float, default=0.9,
                   help="spectral norm L < 1 of every layer of psi (Sec. 5: 0.9)")
    g.add_argument("--part-blocks", type=int, default=None,
                   help="residual blocks x + psi(x) in phi (Sec. 5: 20, i.e. 60 convs)")
    g.add_argument("--part-width", type=int, default=None, help="hidden channels/units inside psi")
    g.add_argument("--part-levels", type=int, default=None,
                   help="images: squeeze (2x2 space-to-depth) levels, blocks split over them (ours: 3; official i-ResNet: 2)")
    g.add_argument("--part-steps", type=int, default=None, help="Adam steps on Eq. 5 (SCAN: 50 epochs)")
    g.add_argument("--part-batch-size", type=int, default=None, help="anchors per step (SCAN: 128)")
    g.add_argument("--part-lr", type=float, default=None, help="Adam lr (SCAN: 1e-4)")
    g.add_argument("--part-restarts", type=int, default=None,
                   help="train S this many times from fresh inits and keep the best Eq. 5 over the "
                        "whole kNN graph (ours; as k-means' n_init)")
    g.add_argument("--part-samples", type=int, default=None,
                   help="training points that are embedded, put in the kNN graph and train S (official "
                        "2-D: 10K); default all")
    g.add_argument("--pi-samples", type=int, default=None,
                   help="training points labelled by the trained S to measure pi and the partition "
                        "metrics; default all (fewer: a shorter partition stage, a noisier pi)")
    g.add_argument("--knn-chunk-mb", type=float, default=256.0,
                   help="memory for one block of the kNN similarity matrix (no N x N matrix)")
    g = p.add_argument_group("GAN (Eq. 2, 6, 8)")
    g.add_argument("--steps", type=int, default=None, help="G updates")
    g.add_argument("--batch-size", type=int, default=None, help="global batch (official: 100)")
    g.add_argument("--arch", default=None, choices=["mlp", "resnet", "dcgan", "pacgan"],
                   help="G/D networks (mlp on 2-D; resnet = SN-GAN, Sec. 5; pacgan: PacGAN's stacked-MNIST G "
                        "and reduced D with k outputs, its own preset)")
    common.add_pacgan_args(g)
    g.add_argument("--width", type=int, default=None, help="MLP hidden units (official 2-D: 200) / base channels (64)")
    g.add_argument("--d-act", default=None, choices=["maxout", "relu"],
                   help="activation of the mlp D on 2-D data (official: maxout, 5 pieces)")
    g.add_argument("--img-size", type=int, default=None, help="image resolution (default: the dataset's; STL-10 48)")
    g.add_argument("--z-dim", type=int, default=None, help="latent dimension (official: 2 on 2-D, 128 images)")
    g.add_argument("--lr", type=float, default=None, help="Adam lr of G (and of D without --lr-d; official images: 2e-4)")
    g.add_argument("--lr-d", type=float, default=None,
                   help="Adam lr of D (default: --lr; pacgan preset: 2e-4, PacGAN config.py)")
    g.add_argument("--lr-decay-from", type=float, default=None,
                   help="fraction of --steps after which the lr of G and D decays linearly to 0 "
                        "(1 = constant, as in the official image configs; 2-D default ours)")
    g.add_argument("--beta1", type=float, default=None, help="Adam beta1 (official images: 0)")
    g.add_argument("--beta2", type=float, default=None, help="Adam beta2 (official images: 0.999)")
    g.add_argument("--n-dis", type=int, default=None,
                   help="D updates per G update (official images: 4; 2-D: 1, official 2d_mix). On 2-D data 1 "
                        "squeezes each mode (std ratio 0.10 ring, 0.44 grid); 4 with --lr 2e-4 --beta1 0 keeps "
                        "most of its spread (0.82, 0.86; ours; README, PGMGAN on 2-D data)")
    g.add_argument("--loss", default=None, choices=["hinge", "standard"],
                   help="hinge (official images) or standard = Eq. 2 with the non-saturating G loss "
                        "(official 2-D)")
    g.add_argument("--guide-weight", type=float, default=None,
                   help="initial lambda of Eq. 8 (Sec. 5.4: 6.0, on Eq. 6's summed R; the image presets' 6.0 is the "
                        "official one, on the mean over c: = 6/k on the sum; that the paper's 6.0 is the mean's, "
                        "as only the mean makes lambda k-independent, is our argument); 0 = baseline 'Partition GAN'")
    g.add_argument("--guide-anneal", type=float, default=None,
                   help="lambda decreases by this much per G step (official: 1.2e-4)")
    g.add_argument("--guide-min", type=float, default=None, help="floor of lambda (official: 0 / 1e-4)")
    g.add_argument("--guide-reduce", default=None, choices=["sum", "mean"],
                   help="R_i sums over c (Eq. 6) or averages (official code): mean with lambda L = sum "
                        "with lambda L/k. 2-D presets: sum, lambda 1.0 (ours; = mean with lambda 8 ring, "
                        "25 grid); image presets: mean, the official lambda 6.0 (= sum with 6/k, 0.03 at k 200)")
    g.add_argument("--no-rejection", action="store_true",
                   help="sample without the rejection step (keep x = G_i(z) even if R_i(x) > 0)")
    g.add_argument("--reject-tries", type=int, default=50,
                   help="rejection: redraws of z per sample, same partition id (ours; official: 21); "
                        "a sample still rejected is kept and counted as 'forced'")
    g.add_argument("--ema", type=float, default=None,
                   help="EMA decay of G's weights, 0 = off (ours: the official image configs average "
                        "no weights; e.g. 0.9999)")
    g.add_argument("--ema-start", type=int, default=None, help="G step at which the EMA starts (ours: 10K)")
    common.add_eval_args(g, "samples for metrics.json (paper and official code: 50K; fewer is ours, for time); "
                            "0 = no final metrics", classifier=True)
    common.add_runtime_args(p)
    args = p.parse_args(argv)
    common.apply_presets(args, preset_for(args), METHOD)
    points = common.dataset_info(data_name(args))["kind"] == "points"
    if args.img_size is None:
        args.img_size = 1 if points else IMG_SIZE.get(args.dataset, common.DATASETS[data_name(args)]["img_size"])
    if points and args.arch != "mlp":
        raise common.UsageError("2-D data needs --arch mlp")
    if args.d_act is not None and args.arch != "mlp":
        raise common.UsageError(f"--d-act sets the mlp D of 2-D data; --arch {args.arch} has its own activations")
    common.check_flags(args, positive=("k", "z_dim", "n_dis", "width", "img_size", "lr", "lr_d", "d_width", "neighbors",
                                       "part_blocks", "part_width", "part_steps", "part_batch_size",
                                       "part_lr", "part_restarts", "part_samples", "pi_samples", "pretext_batch_size", "pretext_lr",
                                       "temperature", "proj_dim", "knn_chunk_mb", "reject_tries"),
                       nonnegative=("beta1", "beta2", "alpha", "beta", "guide_weight", "guide_anneal",
                                    "guide_min", "ema", "ema_start", "eval_samples", "pretext_steps",
                                    "part_levels"))
    common.check_simclr_args(args)
    common.check_in(args, "lipschitz", "(0, 1)", "Thm. 3 needs L < 1")
    if args.partitioner == "unconstrained" and not points:
        raise common.UsageError("--partitioner unconstrained is the 2-D ablation of Sec. 5.1 (grid/ring only)")
    common.check_shared_flags(args)
    args.data_name = data_name(args)     # saved with the args: evaluate.py ckpt reads it
    return args


def data_name(args):
    return DATA_NAME.get(args.dataset, args.dataset)


def is_points(args):
    return common.dataset_info(data_name(args))["kind"] == "points"


def uses_pretext(args):
    """Sec. 5.1: no feature learning on 2-D data; nothing to learn for random or single partitions."""
    return not is_points(args) and args.partition == "learned" and args.k > 1


def uses_partitioner(args):
    """A trained S exists (and with it the guide and the rejection step)."""
    return args.partition == "learned" and args.k > 1


# ==================================================================================================
# 2. The Lipschitz-bounded partitioner (Sec. 4.2, Theorem 3)
# ==================================================================================================
# Theorem 3: if c0 ||x - y|| <= ||phi(x) - phi(y)|| (c0 > 0), every local optimum of R_i is global,
# ||grad R_i|| >= b0 > 0 outside A_i, and every A_i is connected. Sec. 4.2: blocks B(x) = x + psi(x),
# psi = m layers of operator norm L < 1 with 1-Lipschitz activations (ELU), so Lip(psi) <= L^m and
# ||B(x) - B(y)|| >= (1 - L^m) ||x - y||. phi keeps the dimension of x: 2-D data stays in R^2;
# images pass "squeeze" levels (2x2 space-to-depth, an isometry), as the i-ResNet (Behrmann 2019).
# Official code (models/invertible_resnet/models/conv_iResNet.py, `iresnet()`): input zero-padded
# 3 -> 16 channels (injective padding), 21 blocks in 3 stages of 7 (strides 1, 2, 2: two squeezes;
# hidden widths 32/64/128), block = ActNorm, conv 3x3, conv 1x1, conv 3x3 with ELUs, soft spectral
# norm 0.9 (5 power iterations); then BatchNorm, LeakyReLU, average pooling, Linear(256, 512) (512:
# its "classifier" output, SCAN's features) and SCAN's head Linear(512, k). Pooling and that head
# break Thm. 3's lower bound; we put W on the flattened phi(x). Depth 20, 3x3 convs, no ActNorm: ours.

class LipschitzLayer(nn.Module):
    """A Linear or 3x3 stride-1 Conv2d whose operator norm is scaled to at most `lipschitz` (the
    branches of the Lipschitz-bounded partitioner, Sec. 4.2: psi's layers of operator norm L < 1).

    Power iteration (one step per training forward, persistent vector u, as Miyato et al. 2018)
    runs on the layer's *actual* linear map: for a conv that is the convolution over a
    (C, H, W) input, not the reshaped weight matrix, whose norm does not bound the conv's
    (i-ResNet's spectral_norm_conv does the same). The output is scaled by min(1, L / sigma):
    layers already below L are left alone (i-ResNet's soft normalisation).
    """

    def __init__(self, layer, lipschitz, in_shape):
        super().__init__()
        self.layer, self.lipschitz = layer, lipschitz
        u = torch.randn(1, *in_shape)
        self.register_buffer("u", u / u.norm())
        self.register_buffer("sigma", torch.ones(()))

    def _apply_op(self, x):                                 # A x (no bias)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, self.layer.weight)
        return F.conv2d(x, self.layer.weight, padding=self.layer.padding)

    def _apply_adjoint(self, v):                            # A^T v
        if isinstance(self.layer, nn.Linear):
            return F.linear(v, self.layer.weight.t())
        return F.conv_transpose2d(v, self.layer.weight, padding=self.layer.padding)

    @torch.no_grad()
    def power_iteration(self, n=1):
        """n steps of u <- A^T A u / ||A^T A u||; sigma = ||A u|| estimates the top singular value."""
        u = self.u
        for _ in range(n):
            u = self._apply_adjoint(self._apply_op(u))
            u = u / u.norm().clamp_min(1e-12)
        self.u.copy_(u)
        self.sigma.copy_(self._apply_op(u).norm())

    def forward(self, x):
        if self.training:
            self.power_iteration(1)
            # sigma with a gradient through the weight (u fixed), as in spectral normalisation.
            sigma = self._apply_op(self.u.clone()).norm()
        else:
            sigma = self.sigma
        scale = torch.clamp(self.lipschitz / sigma.clamp_min(1e-12), max=1.0)
        out = self._apply_op(x) * scale
        if self.layer.bias is not None:
            out = out + (self.layer.bias if out.dim() == 2 else self.layer.bias[:, None, None])
        return out


class ResidualBlock(nn.Module):
    """B(x) = x + psi(x), psi = 3 Lipschitz layers with ELU between (Sec. 4.2, m = 3 as in Sec. 5:
    20 blocks = 60 convs). shape: (dim,) for vectors, (C, H, W) for feature maps."""

    def __init__(self, shape, hidden, lipschitz):
        super().__init__()
        if len(shape) == 1:
            d = shape[0]
            layers = [nn.Linear(d, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, d)]
            shapes = [(d,), (hidden,), (hidden,)]
        else:
            c, h, w = shape
            layers = [nn.Conv2d(c, hidden, 3, padding=1), nn.Conv2d(hidden, hidden, 3, padding=1),
                      nn.Conv2d(hidden, c, 3, padding=1)]
            shapes = [(c, h, w), (hidden, h, w), (hidden, h, w)]
        self.psi = nn.ModuleList([LipschitzLayer(l, lipschitz, s) for l, s in zip(layers, shapes)])

    def forward(self, x):
        h = x
        for i, layer in enumerate(self.psi):
            h = layer(h)
            if i < len(self.psi) - 1:
                h = F.elu(h)                              # 1-Lipschitz
        return x + h


class Partitioner(nn.Module):
    """phi (Lipschitz-bounded residual network) and W: logits f(x) = W phi(x) (k,); S = softmax(f).

    The same class is the pretext network's trunk phi_0 (with a ProjectionHead) and the
    partitioner's phi, so S_init = softmax(W_0 phi_0(x)) (Sec. 4.1) is a plain state-dict copy.
    For images: squeeze, blocks, squeeze, blocks, ... (`levels` squeezes, blocks split evenly).
    """

    def __init__(self, in_shape, k, n_blocks, width, lipschitz, levels=0):
        super().__init__()
        self.in_shape, self.levels = tuple(in_shape), levels
        per_level = [n_blocks // max(levels, 1) + (i < n_blocks % max(levels, 1))
                     for i in range(max(levels, 1))]
        blocks, shape = [], self.in_shape
        for level, count in enumerate(per_level):
            if levels > 0:
                if shape[1] % 2 or shape[2] % 2:
                    raise common.UsageError(f"--part-levels {levels}: size {shape[1]} cannot be "
                                            f"halved {levels} times")
                shape = (shape[0] * 4, shape[1] // 2, shape[2] // 2)
            blocks.append(nn.ModuleList([ResidualBlock(shape, width, lipschitz) for _ in range(count)]))
        self.blocks = nn.ModuleList(blocks)
        self.feat_dim = int(np.prod(shape))
        self.head = nn.Linear(self.feat_dim, k)               # W (with a bias, Sec. 4.1 omits it)

    def features(self, x):
        """phi(x), flattened: (B, feat_dim) with feat_dim = the input's dimension."""
        h = x
        for level in self.blocks:
            if self.levels > 0:
                h = F.pixel_unshuffle(h, 2)                   # (B, 4C, H/2, W/2): squeeze
            for block in level:
                h = block(h)
        return h.flatten(1)

    def forward(self, x):
        return self.head(self.features(x))                   # logits f(x): (B, k)

    @torch.no_grad()
    def converge(self, n=100):
        """Run the power iterations to convergence (before S is frozen and used in eval mode)."""
        for m in self.modules():
            if isinstance(m, LipschitzLayer):
                m.power_iteration(n)


def build_partitioner(args, channels):
    if getattr(args, "partitioner", "lipschitz") == "unconstrained":
        # Sec. 5.1's ablation (Fig. 3-4, right): "a multi-layer fully connected network with ReLU
        # activations", no Lipschitz bound (2-D only). Sizes ours: the paper gives none; the
        # official 2d_mix `Net` is 2 -> 10 -> 20 -> k.
        return common.ReLUClassifier(channels, args.k, args.part_blocks, args.part_width)
    shape = (channels,) if is_points(args) else (channels, args.img_size, args.img_size)
    levels = 0 if is_points(args) else args.part_levels
    return Partitioner(shape, args.k, args.part_blocks, args.part_width, args.lipschitz, levels)


def load_partitioner(args, channels, state, path, device):
    """The trained S of a state dict (None: no partitioner), frozen; eval mode: stored sigmas."""
    if state is None:
        return None
    S = build_partitioner(args, channels)
    common.load_state(S, state, "partitioner", path)
    return S.to(device).eval().requires_grad_(False)


# ==================================================================================================
# 3. The kNN graph and the partition loss (Eq. 5)
# ==================================================================================================

def partition_loss(p_anchor, p_neighbor, alpha, beta, eps=1e-8):
    """Eq. 5 as a loss to minimise, with means instead of sums:

        - mean_(i,j) log <S(x_i), S(x_j)>  +  alpha mean_i H(S(x_i))  -  beta H(mean_i S(x_i))

    Eq. 5 sums its first term over all |E| edges and its second over all n points, but its third
    is a single term: with means, this beta equals Eq. 5's beta times |E| (and alpha its alpha
    times |E| / n). SCAN (and so the authors' partitioners) weight the terms this way; beta 5 here
    is SCAN's entropy weight, not a value of Eq. 5's scale.

    p_anchor, p_neighbor: (B, k) probabilities of B anchors and one kNN neighbour of each (SCAN's
    sampling of the edges). H(mean S) uses the batch mean (SCAN). Returns (loss, terms dict).
    """
    consistency = -torch.log((p_anchor * p_neighbor).sum(1).clamp_min(eps)).mean()
    sharp = common.entropy(p_anchor, eps).mean()
    balance = common.entropy(p_anchor.mean(0), eps)
    return consistency + alpha * sharp - beta * balance, dict(consistency=consistency, entropy=sharp,
                                                             balance=balance)


@torch.no_grad()
def partition_objective(probs, nbrs, alpha, beta, chunk=4096):
    """Eq. 5 (as the loss of partition_loss) over the whole kNN graph instead of a batch: every
    point i with every one of its neighbours j, and H of the mean over all points. probs: (n, k)
    softmax S of the n graph points; nbrs: (n, m) neighbour indices. Chunked over points (no
    n x m x k tensor at once). Used to pick the best of --part-restarts trainings of S."""
    n = len(probs)
    consistency = sum(-torch.log((probs[i:i + chunk, None, :] * probs[nbrs[i:i + chunk]]).sum(2)
                                 .clamp_min(1e-8)).sum() for i in range(0, n, chunk)) / nbrs.numel()
    return float(consistency + alpha * common.entropy(probs, 1e-8).mean() - beta * common.entropy(probs.mean(0), 1e-8))


# ==================================================================================================
# 4. The GAN: losses (Eq. 2), guide (Eq. 6-8), sampling with rejection
# ==================================================================================================

def d_loss_fn(real, fake, kind):
    """D's loss on its own head's outputs (B,) for real data of A_i and fake G_i(z).

    standard: Eq. 2, max E log D(x) + E log(1 - D(G(z))) = min softplus(-real) + softplus(fake).
    hinge   : E relu(1 - real) + E relu(1 + fake). Official code: hinge loss on images.
    """
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss_fn(fake, kind):
    """G's adversarial loss. hinge: -E D(G(z)). standard: the non-saturating -E log D(G(z)) in
    place of Eq. 8's E log(1 - D(G(z))), whose gradient vanishes while D wins (Goodfellow 2014).
    Official code (gan_training/train.py, generator_trainstep_guided): a bug with the standard
    loss (their 2-D runs): BCE with target 2, i.e. softplus(-D) - D, not softplus(-D)."""
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def guide(logits, y, reduce="sum"):
    """Eq. 6: R_i(x) = sum_c (f_c(x) - f_i(x))_+ for i = y, per sample: (B,).

    logits: (B, k) = W phi(x). The c = i term is 0. R_i(x) >= 0, and R_i(x) = 0 exactly when
    f_i(x) is a largest logit, i.e. x in A_i (Eq. 7). Official code: the mean over c (the
    --guide-reduce mean choice), i.e. the sum divided by k.
    """
    own = logits.gather(1, y[:, None])                               # (B, 1): f_i(x)
    r = F.relu(logits - own)                                         # (B, k)
    return r.sum(1) if reduce == "sum" else r.mean(1)


def guided_g_loss(d_fake, logits, y, lam, args):
    """Eq. 8 for the generators: adversarial loss + lambda * mean_j R_y(G_y(z_j)) (Eq. 8 sums the
    adversarial term over j and averages R; we and the official code average both). d_fake: (B,)
    D's outputs on the fakes; logits: (B, k) S's logits of them, or None without a partitioner.
    Returns (total, adversarial term, R per sample or None)."""
    adv = g_loss_fn(d_fake, args.loss)
    r_each = guide(logits, y, args.guide_reduce) if logits is not None else None
    return (adv + lam * r_each.mean() if lam > 0 else adv), adv, r_each


def guide_weight(args, g_step):
    """lambda of Eq. 8 at G step g_step. Sec. 5.4: linear annealing from the initial lambda.
    Official code: lambda_t = max(lambda_0 - 1.2e-4 t, floor), floor 0 (CIFAR) or 1e-4."""
    if args.guide_weight == 0 or not uses_partitioner(args):
        return 0.0
    return max(args.guide_weight - args.guide_anneal * g_step, min(args.guide_min, args.guide_weight))


@torch.no_grad()
def partition_ids(x, idx, S, random_ids):
    """Partition ids of real data x: argmax S(x) (learned partition), the stored random id of each
    training point idx (random baseline), or 0 (k = 1)."""
    if S is not None:
        return S(x.float()).argmax(1)
    if random_ids is not None:
        return random_ids[idx.to(random_ids.device)].to(x.device)    # a table on the device: no sync
    return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)


def make_sampler(G, S, pi, z_dim, device, rejection=True, reject_tries=50, strict=True, bn_batch=False):
    """n -> (n samples, acceptance rate n / draws). y ~ pi (partition sizes of the training data),
    x = G_y(z). With rejection (Sec. 4.2: "only accepting samples with R_i(x) being equal to zero",
    i.e. argmax S(x) = y, Eq. 7), a rejected sample redraws z for the same y, at most reject_tries
    times; y is never redrawn, so the generators' shares stay pi. Samples still rejected then raise
    (strict) or are kept as last drawn and counted in sample.stats["forced"].
    Official code (seeded_sampler.py, SeededRejectionSampler): the same with 21 redraws. Their
    training-time evaluator (gan_training/eval.py) instead takes y = argmax S of real batches and
    never rejects. bn_batch (--arch pacgan): z drawn for all n, then G in PacGAN's batches of 128 with
    BN on batch statistics; a redraw recomputes the whole batches of 128 that hold a rejected sample
    and keeps only the rejected rows' new outputs (ours: every forward stays a batch of 128)."""
    tries = reject_tries if rejection and S is not None else 0
    size = common.PACGAN_BATCH

    def redo(x, z, y, bad):                 # new G_y(z) of the rows `bad`, written into x
        if not bn_batch:
            x[bad] = G(z[bad], y[bad]).float()
            return
        for b in torch.unique(bad // size).tolist():     # the whole batches of 128 that hold them
            new = common.sample_bn_batch(G, z[b * size:(b + 1) * size], y[b * size:(b + 1) * size], size)
            rows = bad[bad // size == b]
            x[rows] = new[rows - b * size].float()

    stats = collections.Counter(drawn=0, returned=0, forced=0)

    def outside(x, y, idx):                     # the rows idx whose x is not in A_y: R_y(x) > 0
        return idx[S(x[idx]).argmax(1) != y[idx]] if tries else idx[:0]

    @torch.no_grad()
    def sample(n):
        y = torch.multinomial(pi.float().cpu(), n, replacement=True).to(device)      # y ~ pi: (n,)
        z = torch.randn(n, z_dim, device=device)
        x = (common.sample_bn_batch(G, z, y, size) if bn_batch else G(z, y)).float()  # x = G_y(z)
        bad, drawn, redraws = outside(x, y, torch.arange(n, device=device)), n, 0
        while len(bad) and redraws < tries:     # redraw z (same y) for the rejected ones
            z[bad] = torch.randn(len(bad), z_dim, device=device)
            redo(x, z, y, bad)
            bad, drawn, redraws = outside(x, y, bad), drawn + len(bad), redraws + 1
        if len(bad) and strict:
            raise RuntimeError(f"rejection sampling: {len(bad)} of {n} samples still rejected "
                               f"after {reject_tries} redraws; use --no-rejection")
        stats.update(drawn=drawn, returned=n, forced=len(bad))
        return x.cpu(), n / drawn

    sample.stats = stats
    return sample


def build_gan(args, channels):
    size = args.img_size
    # The paper's G_i "share all weights except the input layer"; here, as in the official BigGAN G
    # (G_shared false), each partition has its own conditional-BN gains and biases in every block.
    # 2-D (mlp): a learned 32-d embedding of the id concatenated to z (common.MLP; Official code: the
    # 2d_mix get_models of Self-Conditioned GAN, models/cluster.py's embed_size 32).
    G = common.build_generator(args.arch, args.z_dim, size, channels, width=args.width, n_classes=args.k)
    # Official code: D's per-partition output (biggan.py `linear_c`) has a bias; ours
    # (common.OutputHeads) has none. Not added yet: it changes every measured run (README).
    # conv_bias: only the DCGAN D has the option; without biases it learns nothing useful with the
    # hinge loss (README, "PGMGAN on stacked-Fashion-MNIST"). The ResNet and MLP Ds have biases anyway.
    # pacgan: PacGAN's reduced D (BN, no spectral norm) at --d-width, k outputs (common.OutputHeads).
    D = common.build_discriminator(args.arch, size, channels,
                                   width=args.d_width if args.arch == "pacgan" else args.width, out_dim=1,
                                   n_classes=args.k, conv_bias=True, mlp_act=getattr(args, "d_act", None) or "relu")
    return G, D


# ==================================================================================================
# 5. Pictures (Figures 3 and 4) and final metrics
# ==================================================================================================

@torch.no_grad()
def figure3(S, points, labels, args, path, res=160):
    """Figure 3: -R_i over the plane for the partition i of the corner mode (-4, -4) (grid) or of
    the mode at (2, 0) (ring), beside the partition map of the data (points coloured by id)."""
    extent = common.extent_for(args.dataset)
    corner = torch.tensor([[-4.0, -4.0]]) if args.dataset == "grid" else torch.tensor([[2.0, 0.0]])
    dev = next(S.parameters()).device
    i = int(S(corner.to(dev)).argmax(1))
    plane = common.plane_grid(extent, res).to(dev)                     # (res*res, 2)
    r = guide(S(plane), torch.full((len(plane),), i, device=dev), args.guide_reduce).reshape(res, res).cpu()
    # Shown as -log(1 + R_i): same order and the same zero set as -R_i, but the flat top on A_i
    # stays visible beside values in the hundreds far away (a linear map paints it all yellow).
    panels = [common.plot_heatmap((-torch.log1p(r)).numpy(), extent, size=320,
                                  title=f"-log(1 + R_{i}(x)) (Fig. 3): 0 on partition {i}"),
              common.plot_points([(points.numpy(), labels.numpy())], extent, size=320,
                                 title=f"partitions of the data (k={args.k}, {args.partitioner} S)")]
    common.hconcat(panels, path)


@torch.no_grad()
def figure4(sample_fn, real, args, path, n=2500):
    """Figure 4: real (grey) and generated (red) points."""
    fake, _ = sample_fn(n)
    common.plot_points([(real[:n].numpy(), common.REAL_COLOR), (fake.numpy(), common.FAKE_COLOR)],
                       common.extent_for(args.dataset), size=320,
                       title="data (grey) and samples (red), Fig. 4").save(path)


def final_metrics(sample_fn, args, device):
    """metrics.json: Table 1 mode metrics for 2-D and stacked data, IS/FID for other images; every
    kind also carries the sampler's acceptance rate and its count of forced (rejected but kept)
    samples."""
    if args.eval_samples == 0:
        return {}
    if args.dataset.startswith("stacked") and not args.classifier:
        return {"skipped": "no --classifier for the stacked-dataset mode count"}
    n, stats = args.eval_samples, sample_fn.stats
    progress = common.ProgressLine("evaluation", n, "samples")

    def draw(m):                                # m samples, with a progress line
        x, _ = sample_fn(m)
        progress.add(m)
        return x
    if is_points(args):
        out = common.run_points_metrics(draw, args, device, args.dataset)
    elif args.dataset.startswith("stacked"):
        out = common.run_stacked_metrics(draw, args, device, args.dataset)
    else:
        # Against the training images (Official code: utils/get_gt_imgs.py takes CIFAR-10's train split
        # and STL-10's train+unlabeled, which is what common's "train" reads for STL-10).
        out = common.run_image_metrics(draw, args, ["fid", "is"], device, data_name(args), split="train")
        if "skipped" in out:                    # no Inception weights offline: training still counts
            return out
    return dict(out, **sampler_metrics(stats))


def sampler_metrics(stats):
    """The rejection sampler's acceptance rate and its count of forced samples (make_sampler)."""
    return {"acceptance": stats["returned"] / max(stats["drawn"], 1), "forced": stats["forced"]}


def load_sampler(ckpt_path, device="cpu"):
    """For evaluate.py: n -> n samples of the checkpoint's mixture, y ~ pi, with the rejection
    step unless the run used --no-rejection. Uses the EMA generator when the run kept one."""
    ckpt = common.load_checkpoint(ckpt_path, method=METHOD)
    args = argparse.Namespace(**ckpt["args"])
    channels = common.DATASETS[data_name(args)]["channels"]
    G, _ = build_gan(args, channels)
    G = common.load_generator(G, ckpt, ckpt_path, device)
    S = load_partitioner(args, channels, ckpt.get("S"), ckpt_path, device)
    draw = make_sampler(G, S, ckpt["pi"].float(), args.z_dim, device, rejection=not args.no_rejection,
                        reject_tries=args.reject_tries, strict=False, bn_batch=args.arch == "pacgan")

    def sample(n):
        x, _ = draw(n)
        if draw.stats["forced"]:
            print(f"warning: {draw.stats['forced']} of {draw.stats['returned']} samples so far were "
                  f"kept although rejected (their generator rarely lands in its partition)",
                  file=sys.stderr, flush=True)
        return x

    sample.dataset = args.dataset
    sample.data_std = args.data_std
    sample.metrics = lambda: sampler_metrics(draw.stats)          # evaluate.py ckpt adds them
    return sample


# ==================================================================================================
# 6. Stage 1: pretext (SimCLR)
# ==================================================================================================

def stage_path(args, name):
    return os.path.join(args.out, name)


def pretext_net(args, channels):
    """phi_0 + projection head, the same weights on every rank / invocation."""
    torch.manual_seed(args.seed)
    phi = build_partitioner(args, channels)          # phi_0 (its W is unused here)
    phi.head.requires_grad_(False)                   # so DDP waits for no gradient of W
    return common.PretextNet(phi, common.ProjectionHead(phi.feat_dim, args.proj_dim))


def run_pretext(args, rt, dataset, channels):
    """Train phi_0 + projection head with Eq. 4 on two augmented views; save pretext.pt, phi_0 and the
    head for the partition stage. Eq. 4 lives in common.py, section 5b: nt_xent (NT-Xent over the 2N
    views of a batch, the other view of an image its positive), simclr_augment (SCAN's views),
    train_simclr (SCAN's SGD schedule, resumable)."""
    common.train_simclr(lambda: pretext_net(args, channels), args, rt, dataset, METHOD)


# ==================================================================================================
# 7. Stage 2: partition (kNN graph + Eq. 5)
# ==================================================================================================

def train_partitioner(S, args, rt, dataset, sub, nbrs, log, restart=0):
    """--part-steps Adam steps of Eq. 5 on S over the points `sub` and their kNN graph `nbrs`
    (SCAN's sampling: B anchors, one random neighbour each). Returns the unwrapped S in eval mode
    with converged spectral-norm sigmas. SCAN feeds strongly augmented anchors and neighbours and
    counts a point as its own neighbour; here both are clean images and the graph excludes self."""
    device = rt.device
    common.seed_rank(rt, args.seed + 7919 * restart)
    S = rt.wrap(S.to(device))
    # Weight decay: SCAN's 1e-4 (configs/scan/scan_cifar10.yml) on images; 0 on 2-D data (ours, as the
    # official 2-D S's Adagrad).
    opt = torch.optim.Adam(S.parameters(), lr=args.part_lr, weight_decay=1e-4 if not is_points(args) else 0.0)
    meter = common.LossMeter(rt)
    per_rank = max(1, args.part_batch_size // rt.world_size)
    line = common.ProgressLine(f"partition: training S" + (f" ({restart + 1}/{args.part_restarts})"
                               if args.part_restarts > 1 else ""), args.part_steps, "steps", every=30,
                               show=rt.is_main)
    # A stop ends the process: partition.pt is written only whole, --resume runs the stage again.
    run = common.RunControl(rt, args, 0, meter, total=args.part_steps, path=None, stage="partition",
                            shorten="--part-steps", early=False,
                            again="--resume runs it again" if uses_pretext(args) else "run the command again")
    step = 0
    while run.going(step):
        step += 1
        a = torch.randint(len(sub), (per_rank,))
        j = nbrs[a, torch.randint(args.neighbors, (per_rank,))]            # one neighbour each
        x = common.fetch_batch(dataset, sub[torch.cat([a, j])]).to(device)
        with rt.autocast():
            p = F.softmax(S(x).float(), dim=1)                            # (2B, k)
        loss, terms = partition_loss(p[:per_rank], p[per_rank:], args.alpha, args.beta)
        opt.zero_grad(set_to_none=True)
        rt.backward_step(loss, opt)
        meter.add(loss=loss, **terms)
        line.add()
        if step % args.log_every == 0 or step == args.part_steps:
            common.log_step(meter, log, restart * args.part_steps + step, stage_path(args, "partition.pt"),
                            **({"restart": restart + 1} if args.part_restarts > 1 else {}))
        run.checkpoint_due(step)                     # the ranks agree on a stop (nothing to save)
    run.end(step)
    S = common.unwrap(S).eval()
    S.converge(500)                      # exact sigmas for the frozen, eval-mode S
    return S


def graph_features(args, rt, dataset, channels, sub):
    """What the kNN graph is built on, for the points `sub`: the raw coordinates on 2-D data (Sec.
    5.1; Euclidean neighbours) or the pretext head's output h on images (SCAN mines neighbours on
    it; cosine). Returns (features, metric, phi_0's state for S_init or None)."""
    if is_points(args):
        # Official code (2d_mix, toy_guide_clusterer): S is fit by cross-entropy to k-means labels
        # of 10K points; we train the Thm. 3 network with Eq. 5 as for images.
        return common.fetch_batch(dataset, sub), "euclidean", None
    net, pre = common.load_simclr(pretext_net(args, channels), args, METHOD, rt.device)   # a finished one
    feats = common.map_batches(net, dataset, rt.device, batch=500, idx=sub,
                               progress="partition: embedding" if rt.is_main else None)
    return feats, "cosine", {k: v for k, v in pre["phi"].items() if not k.startswith("head.")}


def fit_partitioner(args, rt, dataset, channels, sub, nbrs, phi_state, log):
    """S trained --part-restarts times; the one with the best Eq. 5 over the whole graph is kept
    (label-free, like k-means' n_init; README: a merged pair of grid modes lowers H(mean S))."""
    best = None
    for restart in range(args.part_restarts):
        # Each restart: fresh random weights seeded by --seed and r (every rank agrees); on images
        # phi starts from phi_0 (Sec. 4.1: S_init = softmax(W_0 phi_0(x)), W_0 random).
        torch.manual_seed(args.seed + 7919 * restart)
        S = build_partitioner(args, channels)
        if phi_state is not None:
            S.load_state_dict(phi_state, strict=False)
        S = train_partitioner(S, args, rt, dataset, sub, nbrs, log, restart)
        if args.part_restarts == 1:
            return S
        probs = common.map_batches(lambda b: F.softmax(S(b).float(), 1), dataset, rt.device, batch=2000, idx=sub)
        obj = partition_objective(probs, nbrs, args.alpha, args.beta)
        log.info(f"partition: restart {restart + 1}/{args.part_restarts}: Eq. 5 loss on the graph "
                 f"{obj:.4f}" + (" (best so far)" if best is None or obj < best[0] else ""))
        if best is None or obj < best[0]:
            best = (obj, S)
    return best[1]


def run_partition(args, rt, dataset, channels):
    """Partition ids of the training data and, for a learned partition, S; saves partition.pt with
    pi (partition sizes) and the partition metrics of the ids. The ids: all 0 (k = 1), a fixed
    random id per point (random), or S's labels (learned, learn_partition).

    Under torchrun every rank computes the same features, graph and final labels (deterministic,
    redundant work, no communication); the S training steps are data-parallel through DDP, each
    rank drawing its own anchors, and H(mean S) of Eq. 5 uses each rank's own batch.
    """
    start = time.perf_counter()
    if hasattr(dataset, "set_epoch"):   # redraw: the epoch-0 triplets, whichever stage ran before
        dataset.set_epoch(0)
    # One log (partition/) over all restarts: restart r's step t is logged as r * part_steps + t.
    log = common.Logger(os.path.join(args.out, "partition"), rt.is_main, args.part_steps * args.part_restarts)
    S, random_ids, lab = None, None, torch.arange(len(dataset))    # lab: the points given ids
    if uses_partitioner(args):
        S, lab, pred = learn_partition(args, rt, dataset, channels, log)
    else:   # baseline 'Random Partition ID' (Sec. 5.2): a fixed uniformly random id per point; k = 1: 0
        pred = torch.randint(args.k, (len(dataset),), generator=torch.Generator().manual_seed(args.seed))
        random_ids = pred if args.k > 1 else None
    labels = common.dataset_labels(dataset)
    metrics, sizes = common.clustering_metrics(pred, None if labels is None else labels[lab], args.k)
    # train_seconds so far: the pretext stage's (in pretext.pt) and this one's.
    before = common.saved_seconds(common.load_checkpoint(stage_path(args, "pretext.pt"))) \
        if uses_pretext(args) else 0.0
    rt.train_seconds = before + time.perf_counter() - start
    # exp(H(pi)), the number of partitions in effective use, read to choose k (--k's help).
    effective = torch.exp(common.entropy(sizes.double() / sizes.sum())).item()
    log.info("partition: " + common.format_metrics(metrics) + f", exp(H(pi)) {effective:.1f}")
    if rt.is_main:
        common.save_checkpoint(stage_path(args, "partition.pt"), dict(
            method=METHOD, stage="partition", args=vars(args), S=None if S is None else S.state_dict(),
            random_ids=random_ids, sizes=sizes, metrics=metrics, run={"train_seconds": rt.train_seconds}))
    rt.barrier()
    return metrics


def learn_partition(args, rt, dataset, channels, log):
    """--part-samples training points (all by default), their kNN graph, S fit with Eq. 5, and S's labels
    of --pi-samples points (default all; Fig. 3 on 2-D data). Returns (S, labelled points, their ids)."""
    n_all = len(dataset)
    sub = common.seeded_subset(n_all, args.part_samples, args.seed)   # graph points (official 2-D: 10K)
    kind = ("a ReLU MLP, unconstrained" if args.partitioner == "unconstrained"
            else f"residual blocks, L={args.lipschitz}")
    log.info(f"plan: partition on {len(sub)} of {n_all} training points (--part-samples): "
             + ("" if is_points(args) else "embed them with the pretext network, ")
             + f"kNN graph ({args.neighbors} neighbours), {args.part_restarts} x {args.part_steps} "
             f"steps of batch {args.part_batch_size} (--part-steps, --part-batch-size) on S "
             f"({args.part_blocks} {kind}), then label {args.pi_samples or n_all} points (--pi-samples)")
    feats, metric, phi_state = graph_features(args, rt, dataset, channels, sub)
    t0 = time.perf_counter()
    nbrs = common.knn_graph(feats, args.neighbors, metric, args.knn_chunk_mb, rt.device,
                            progress="partition: kNN graph" if rt.is_main else None)   # (n, neighbors)
    log.info(f"partition: kNN graph of {len(sub)} points in {time.perf_counter() - t0:.1f}s")
    S = fit_partitioner(args, rt, dataset, channels, sub, nbrs, phi_state, log)
    lab = common.seeded_subset(n_all, args.pi_samples, args.seed + 1)
    pred = common.map_batches(lambda b: S(b).argmax(1), dataset, rt.device, batch=500, idx=lab,
                              progress="partition: labelling" if rt.is_main else None).long()
    if is_points(args) and rt.is_main:
        show = common.seeded_subset(len(lab), 5000, seed=0)
        figure3(S, dataset.points[lab[show]], pred[show], args,
                os.path.join(args.out, "partition", "figure3.png"))
    return S, lab, pred


# ==================================================================================================
# 8. Stage 3: the mixture of GANs (Eq. 2, 8)
# ==================================================================================================

def run_gan(args, rt, dataset, channels):
    """Train the mixture (one conditional G/D pair, class = partition id) with the frozen S of
    partition.pt; returns the sampler of the trained mixture and the partition metrics."""
    part_path, device = stage_path(args, "partition.pt"), rt.device
    part = common.load_checkpoint(part_path, method=METHOD)
    common.check_made_with(part_path, part["args"], args, ("dataset", "k", "partition"))
    pi = part["sizes"].double() / part["sizes"].sum()              # pi_i = p_data(A_i)
    S = load_partitioner(args, channels, part["S"], part_path, device)
    random_ids = None if part["random_ids"] is None else part["random_ids"].to(device)    # partition_ids
    data = common.IndexedDataset(dataset) if random_ids is not None else dataset
    stream = common.BatchStream(data, args.batch_size, rt, seed=args.seed, num_workers=args.num_workers)

    # Same seed on every rank -> identical initial weights; then per-rank noise streams.
    torch.manual_seed(args.seed)
    G, D = build_gan(args, channels)
    ema = common.EMA(G, args.ema).to(device) if args.ema > 0 else None
    common.seed_rank(rt, args.seed)
    G, D = rt.wrap(G), rt.wrap(D)
    betas = (args.beta1, args.beta2)
    opt_g = common.adam(G.parameters(), lr=args.lr, betas=betas)
    lr_d = args.lr if getattr(args, "lr_d", None) is None else args.lr_d      # --lr-d, default --lr
    opt_d = common.adam(D.parameters(), lr=lr_d, betas=betas)

    ckpt_path = stage_path(args, "ckpt.pt")
    nets = {"G": G, "D": D, "G_ema": ema}
    opts = {"opt_g": opt_g, "opt_d": opt_d}
    ckpt = common.resume_checkpoint(ckpt_path, args, METHOD)
    step = 0 if ckpt is None else common.restore_training_state(ckpt, nets, opts, rt, stream, args.seed,
                                                                ckpt_path)
    log = common.Logger(args.out, rt.is_main, args.steps, start_step=step)
    meter = common.LossMeter(rt)
    log.info(f"plan: PGMGAN on {args.dataset}: k={args.k} ({args.partition}), {args.steps} G steps x "
             f"n_dis {args.n_dis}, global batch {args.batch_size} on {rt.world_size} process(es), "
             f"{rt.device}, loss {args.loss}, lambda {guide_weight(args, 0)} -{args.guide_anneal}/step "
             f"(floor {args.guide_min}, R reduce {args.guide_reduce}), rejection "
             f"{'off' if args.no_rejection or S is None else 'on'}, seed {args.seed}; "
             f"G {common.count_params(G)} / D {common.count_params(D)} params (--steps, --batch-size, "
             f"--n-dis; then {args.eval_samples} samples for metrics.json, --eval-samples)")
    line = common.ProgressLine("gan", args.steps - step, "G steps", every=30, show=rt.is_main)
    D_plain = common.unwrap(D)       # D inside G's loss: no DDP gradient sync (common.Runtime.wrap)
    per_rank = args.batch_size // rt.world_size
    fixed_real = dataset.points[common.seeded_subset(len(dataset), 2500, seed=0)] if is_points(args) else None

    # Ctrl-C / SIGTERM: stop after this step, saved; a checkpoint at the last step; the time of
    # the stages before (partition.pt) counts in train_seconds.
    run = common.RunControl(rt, args, step, meter, ckpt, early=False,
                            seconds=common.saved_seconds(part))
    while run.going(step):
        factor = common.lr_factor(step, args.steps, args.lr_decay_from)
        lr = args.lr * factor
        common.set_lr((opt_g,), lr)
        common.set_lr((opt_d,), lr_d * factor)
        # ---- D steps: max_D sum_i pi_i V(D_i, G_i, A_i) (Eq. 1-2). Real x of the batch carry
        # their partition ids y = argmax S(x); the fakes are G_y(z) for the same ids, so each
        # head D_y sees real and fake data of partition y in the proportions pi. Eq. 2 takes the
        # fake term over z with G(z) in A_i; training (ours and official) uses every G_y(z), and
        # only sampling rejects G_y(z) outside A_y.
        for _ in range(args.n_dis):
            x, extra = next(stream)
            y = partition_ids(x, extra, S, random_ids)
            z = torch.randn(per_rank, args.z_dim, device=device)
            with rt.autocast():
                with torch.no_grad():
                    fake = G(z, y)
                # Real and fake in one forward of the DDP-wrapped D (one gradient reduction);
                # apart for a BN D (pacgan), as PacGAN (common.d_real_fake).
                d_real, d_fake = common.d_real_fake(D, x, fake, y, y)
                d_loss = d_loss_fn(d_real.float().squeeze(1), d_fake.float().squeeze(1), args.loss)
            opt_d.zero_grad(set_to_none=True)
            rt.backward_step(d_loss, opt_d)

        # ---- G step (Eq. 8): min_{G_i} adversarial loss + lambda * mean_j R_i(G_i(z_j)). Its labels
        # y are the last D step's, the partition ids of that real batch, so each G_i trains in pi's share.
        # Eq. 8 sums the adversarial term over j and averages R; we (and the official code) average both.
        # Official code: the G step reuses the last D step's z; ours draws a fresh z.
        lam = guide_weight(args, step)
        z = torch.randn(per_rank, args.z_dim, device=device)
        with rt.autocast():
            fake = G(z, y)
            d_fake = D_plain(fake, y).float().squeeze(1)
            # Eq. 6, 8. With lambda = 0 (Partition GAN) R is still measured, without a gradient,
            # so the log shows how far the generators stray from their partitions.
            with torch.set_grad_enabled(lam > 0):
                logits = S(fake).float() if S is not None else None
        g_loss, adv, r_each = guided_g_loss(d_fake, logits, y, lam, args)
        opt_g.zero_grad(set_to_none=True)
        rt.backward_step(g_loss, opt_g)
        step += 1
        line.add()
        if ema is not None:
            # Ours (--ema): the EMA starts as a copy at ema_start, then decays each step.
            ema.step(G, step, args.ema_start)
        meter.add(d_loss=d_loss, g_loss=adv, lam=lam,
                  **({} if r_each is None else dict(guide=r_each.mean(), outside=(r_each > 0).float().mean())))

        # ---- logging / checks / pictures / checkpoint
        if step % args.log_every == 0 or step == args.steps:
            common.log_step(meter, log, step, ckpt_path, lr=lr)
        if rt.is_main and (step % args.sample_every == 0 or step == args.steps):
            save_samples(G, ema, S, pi, fixed_real, args, device, step)
        if run.checkpoint_due(step):                             # collective: every rank calls it
            # Besides the training state: the frozen partitioner and the priors pi, so that
            # load_sampler needs nothing but this file.
            common.save_training_state(ckpt_path, METHOD, args, step, nets, opts, rt, stream, stage="gan",
                                       S=part["S"], pi=pi.float(), partition_metrics=part["metrics"],
                                       **run.state())
    run.end(step)
    G_eval = (ema.shadow if ema is not None else common.unwrap(G)).eval()
    return make_sampler(G_eval, S, pi.float(), args.z_dim, device, rejection=not args.no_rejection,
                        reject_tries=args.reject_tries, strict=False, bn_batch=args.arch == "pacgan"), part["metrics"]


def save_samples(G, ema, S, pi, fixed_real, args, device, step):
    """The picture of this step. Its noise comes from a forked RNG (common.drawing), so that drawing
    pictures (which a run that stops at this step does and an uninterrupted run may not) never shifts
    the training noise: a resumed run stays bit-identical."""
    path = os.path.join(args.out, "samples", f"step_{step:07d}.png")
    with common.drawing(ema.shadow if ema is not None else common.unwrap(G), device, seed=step) as net:
        if fixed_real is not None:
            sampler = make_sampler(net, S, pi.float(), args.z_dim, device, rejection=not args.no_rejection,
                                   reject_tries=args.reject_tries, strict=False)
            figure4(sampler, fixed_real, args, path)
        else:
            ids = torch.argsort(pi, descending=True)[:min(10, args.k)]       # the 10 largest partitions
            common.class_rows(net, ids, args.z_dim, device, path)              # a row each, Figure 1 style


# ==================================================================================================
# 9. main: the stages in order
# ==================================================================================================

STAGE_FILES = {"pretext": "pretext.pt", "partition": "partition.pt", "gan": "ckpt.pt"}


def plan_stages(args):
    """The stages this invocation runs (common.plan_stages: a finished stage is skipped with
    --resume and never overwritten without it; the pretext and the GAN continue mid-way, a
    finished pretext.pt is skipped by run_pretext)."""
    wanted = ["pretext", "partition", "gan"] if args.stage == "all" else [args.stage]
    wanted = [s for s in wanted if s != "pretext" or uses_pretext(args)]
    needs = {"partition": "pretext" if uses_pretext(args) else None, "gan": "partition"}
    return common.plan_stages(args.out, args.resume, wanted, STAGE_FILES, needs, resumable=("pretext", "gan"))


def main(argv=None):
    args = common.restore_args(parse_args(argv), ("ckpt.pt", "partition.pt", "pretext.pt"), METHOD, RUN_CONTROL)
    rt = common.setup_runtime(args.device, args.amp, args.seed, args.compile, args.threads)
    todo = plan_stages(args)
    if not todo:
        if rt.is_main:
            print(f"nothing to do: --stage {args.stage} has no work for --dataset {args.dataset} "
                  f"--partition {args.partition} --k {args.k} (no pretext stage there), or it is done",
                  flush=True)
        common.shutdown(rt)
        return
    channels = common.dataset_info(data_name(args))["channels"]
    # The data first: a missing or broken dataset stops the run before anything is written.
    dataset = common.build_dataset(data_name(args), root=args.data_root, img_size=args.img_size,
                                   download=args.download, data_std=args.data_std,
                                   redraw=bool(getattr(args, "redraw", False)))
    common.write_run_args(args.out, args, rt.is_main)
    start = time.perf_counter()
    metrics = {}
    if "pretext" in todo:
        run_pretext(args, rt, dataset, channels)
    if "partition" in todo:
        metrics = run_partition(args, rt, dataset, channels)
    if "gan" in todo:
        sample_fn, part_metrics = run_gan(args, rt, dataset, channels)
        if rt.is_main:
            # metrics.json: the mixture's metrics and the partition's (prefixed "partition").
            with common.metric_precision():      # no TF32 / cuDNN autotuning for metrics, as evaluate.py
                final = final_metrics(sample_fn, args, rt.device)
            metrics = dict(final,
                           **{k if k.startswith("partition") else f"partition_{k}": v
                              for k, v in part_metrics.items()})
    if rt.is_main and metrics:
        common.finish_run(rt, args, metrics, start)
    common.shutdown(rt)


if __name__ == "__main__":
    common.run_cli(main)
