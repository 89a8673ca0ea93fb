"""The reduced-discriminator stacked benchmark (PacGAN Table 3, after Unrolled GAN), on the CPU.

    # the protocol's DCGAN as a minimal loop: the table's DCGAN row and the speed floor
    OMP_NUM_THREADS=1 python tests/bench_pacgan.py floor --out runs/pacgan/dcgan-d2-s0 --steps 100000
    # count every kept generator of a run (the budget curve), with a mode classifier
    python tests/bench_pacgan.py curve --out runs/pacgan/dcgan-d2-s0 --classifier runs/classifier.pt

The protocol (fjxmlzn/PacGAN, stacked_MNIST_experiments/unrolled_GAN_experiment/D=0.25G, model.py):
each sample stacks three training images drawn at random (with replacement, independently) as R, G,
B, in [-1, 1]; z ~ N(0, I_256); G and D are common.PacGANGenerator / PacGANDiscriminator (D at 1/4
of G: width 2; at 1/2: width 4); BCE on D's logit with the non-saturating G loss; each iteration
one D step on a fresh real batch and G(z), then one G step on the same z; Adam betas (0.5, 0.99),
lr 2e-4 for D and 1e-4 for G; batch 128. Both nets stay in training mode throughout, as in the
TensorFlow original (its batch_norm always normalises with the batch's statistics), so the sampler
also uses batch statistics. We run it on stacked Fashion-MNIST (MNIST is not available offline).

`floor` is that loop and nothing else: no logging beyond a line every --log-every steps, a resumable
checkpoint (ckpt.pt) and a copy of G (g_<step>.pt) every --ckpt-every steps, so the mode count can be
redone on every kept G later with whatever counter is current. A killed run continues from ckpt.pt.
"""

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import common  # noqa: E402

# The protocol's constants: PacGAN model.py / config.py (D=0.25G), also in the summary.
Z_DIM, BATCH, LR_D, LR_G, BETAS = 256, 128, 2e-4, 1e-4, (0.5, 0.99)
COUNT_N = 25_600        # PacGAN's num_training_sample: samples per count, one fixed z set
COUNT_Z_SEED = 4321     # ours: the fixed z set of every count


def load_train_images(root):
    images, _ = common.load_mnist_like("fashion-mnist", root, split="train")
    return images[:, 0].contiguous()                              # (60000, 28, 28) uint8


def stacked_batch(images, n, gen):
    """n stacked samples: three independent uniform draws from the training images per sample."""
    idx = torch.randint(0, images.shape[0], (n, 3), generator=gen)
    return images[idx].float().div_(127.5).sub_(1.0)              # (n, 3, 28, 28) in [-1, 1]


def build(d_width, seed):
    torch.manual_seed(seed)
    G = common.build_generator("pacgan", Z_DIM, 28, 3)
    D = common.build_discriminator("pacgan", 28, 3, width=d_width)
    opt_g = torch.optim.Adam(G.parameters(), lr=LR_G, betas=BETAS)
    opt_d = torch.optim.Adam(D.parameters(), lr=LR_D, betas=BETAS)
    return G, D, opt_g, opt_d


def floor(args):
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    images = load_train_images(args.data_root)
    G, D, opt_g, opt_d = build(args.d_width, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step, seconds = 0, 0.0
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        for obj, key in ((G, "G"), (D, "D"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            obj.load_state_dict(ck[key])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        step, seconds = ck["step"], ck["seconds"]
        print(f"resumed at step {step}", flush=True)
    else:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ones = torch.ones(BATCH, 1)
    zeros = torch.zeros(BATCH, 1)
    bce = F.binary_cross_entropy_with_logits
    t0, s0 = time.time(), step
    log = open(os.path.join(args.out, "log.jsonl"), "a")
    while step < args.steps and not stop:
        x = stacked_batch(images, BATCH, gen)
        z = torch.randn(BATCH, Z_DIM, generator=gen)
        # D step: real batch and G(z), each through D on its own (BN statistics per batch).
        fake = G(z)
        d_loss = bce(D(x), ones) + bce(D(fake.detach()), zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # G step on the same z, against the updated D (non-saturating loss). G is unchanged since
        # `fake` was drawn and its BN uses batch statistics, so G(z) again would equal `fake`: reuse it.
        g_loss = bce(D(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        step += 1
        if step % args.log_every == 0:
            now = time.time()
            rate = (step - s0) / (now - t0)
            rec = dict(step=step, d_loss=d_loss.item(), g_loss=g_loss.item(), it_s=rate)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if step % args.ckpt_every == 0 or step == args.steps or stop:
            save(args, ckpt_path, G, D, opt_g, opt_d, gen, step, seconds + time.time() - t0)
    save(args, ckpt_path, G, D, opt_g, opt_d, gen, step, seconds + time.time() - t0)
    print(f"stopped at step {step}" if stop else f"finished {step} steps", flush=True)


def save(args, path, G, D, opt_g, opt_d, gen, step, seconds):
    state = dict(G=G.state_dict(), D=D.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                 gen=gen.get_state(), torch_rng=torch.get_rng_state(), step=step, seconds=seconds,
                 d_width=args.d_width, seed=args.seed)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    if step % args.ckpt_every == 0:
        g_path = os.path.join(args.out, f"g_{step:06d}.pt")
        torch.save(dict(G=G.state_dict(), step=step, seconds=seconds), g_path + ".tmp")
        os.replace(g_path + ".tmp", g_path)


@torch.no_grad()
def draw(G, n=COUNT_N, seed=COUNT_Z_SEED, batch=BATCH):
    """n samples of G from one fixed z set, in batches of the protocol's 128 with G's BN on each
    batch's statistics (PacGAN's sampler: its batch_norm never leaves training mode)."""
    z = torch.randn(n, Z_DIM, generator=torch.Generator().manual_seed(seed))
    G.train()
    return torch.cat([G(z[i:i + batch]) for i in range(0, n, batch)])


def load_g(path):
    G = common.build_generator("pacgan", Z_DIM, 28, 3)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    G.load_state_dict(ck["G"])
    return G, ck


def count(G, classifier):
    """Both counts of PacGAN's Table 3 protocol on COUNT_N samples: the raw argmax count and the
    project's calibrated one (common.stacked_mode_metrics)."""
    x = draw(G)
    return common.stacked_mode_metrics(x, classifier), x


def curve(args):
    """Count every kept G of a run (g_<step>.pt) with the classifier; writes curve.json."""
    classifier = common.load_mode_classifier(args.classifier)
    files = sorted(f for f in os.listdir(args.out) if f.startswith("g_") and f.endswith(".pt"))
    rows = []
    for name in files:
        G, ck = load_g(os.path.join(args.out, name))
        m, x = count(G, classifier)
        rows.append(dict(step=ck["step"], seconds=round(ck["seconds"], 1), **m))
        print(json.dumps(rows[-1]), flush=True)
        common.save_image_grid(x[:100], os.path.join(args.out, name.replace(".pt", ".png")), nrow=10)
    common.write_json(os.path.join(args.out, "curve.json"),
                      dict(classifier=args.classifier, n=COUNT_N, z_seed=COUNT_Z_SEED, rows=rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("floor", help="the protocol's DCGAN as a minimal loop")
    f.add_argument("--out", required=True)
    f.add_argument("--steps", type=int, default=100_000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--d-width", type=int, default=2, help="2: D = 1/4 G (585 parameters); 4: D = 1/2 G")
    f.add_argument("--ckpt-every", type=int, default=5000)
    f.add_argument("--log-every", type=int, default=500)
    f.add_argument("--data-root", default=common.FASHION_MNIST_SYSTEM_DIR)
    c = sub.add_parser("curve", help="count every kept G of a run")
    c.add_argument("--out", required=True)
    c.add_argument("--classifier", required=True)
    args = p.parse_args(argv)
    {"floor": floor, "curve": curve}[args.cmd](args)


if __name__ == "__main__":
    main()
