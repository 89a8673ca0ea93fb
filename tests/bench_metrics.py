"""Benchmark of the metric code against pytorch-fid (not collected by pytest: no test_ prefix).

    python tests/bench_metrics.py [--images 100] [--batch-size 50] [--fid-reps 3]

1. FID from two 2048-d statistics: common.fid_from_stats vs pytorch-fid's
   calculate_frechet_distance (scipy.linalg.sqrtm); time and relative difference.
2. Feature extraction, same PNG files, same weights: evaluate.py's path (the `folder` dataset ->
   common.uint8_batches -> common.extract) vs pytorch-fid's get_activations; images/s and the
   largest difference.

Weights: `--inception-weights PATH` (the standard file if you have it), else random weights in the
standard format (speed does not depend on the values). pytorch-fid must be installed beside the
project (`pip install pytorch-fid`); it is not a dependency of the project.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def random_fid_weights(path, seed=0):
    """A random FID Inception state dict in the standard file format (also used by the tests).

    Convs get He-normal weights and the BN layers random affine parameters and running statistics,
    so activations keep a sane scale through all 94 layers and BN folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    state = common.FIDInceptionV3().state_dict()
    for k, v in state.items():
        if k.endswith("conv.weight"):
            v.copy_(torch.randn(v.shape, generator=gen) * (2.0 / v[0].numel()) ** 0.5)
        elif k.endswith("bn.weight"):
            v.copy_(torch.rand(v.shape, generator=gen) + 0.5)
        elif k.endswith("bn.bias") or k.endswith("running_mean"):
            v.copy_(torch.randn(v.shape, generator=gen) * 0.1)
        elif k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=gen) * 1.5 + 0.5)
        elif k == "fc.weight":
            v.copy_(torch.randn(v.shape, generator=gen) * 0.01)
    torch.save(state, path)
    return path


def pytorch_fid_model(weights):
    """pytorch-fid's InceptionV3 (pool3 block) with its weights read from `weights`."""
    from pytorch_fid import inception as pfi

    pfi.load_state_dict_from_url = lambda *a, **k: torch.load(weights, map_location="cpu")
    return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def bench_fid(reps):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    d, n = 2048, 4096
    stats = []
    for shift in (0.0, 0.2):
        mix = rng.standard_normal((d, d)) / np.sqrt(d)
        x = np.maximum(rng.standard_normal((n, d)) @ mix + shift, 0)   # ReLU-like features
        stats.append((x.mean(0), np.cov(x, rowvar=False)))
    (m1, s1), (m2, s2) = stats
    ours, ref = [], []
    for _ in range(reps):                    # interleaved: both see the same machine load
        t = time.perf_counter()
        a = common.fid_from_stats(m1, s1, m2, s2)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = calculate_frechet_distance(m1, s1, m2, s2)
        ref.append(time.perf_counter() - t)
    to, tr = min(ours), min(ref)
    print(f"FID from 2048-d statistics (best of {reps}):")
    print(f"  common.fid_from_stats        {to:8.3f} s   FID {a:.9f}")
    print(f"  pytorch-fid (scipy sqrtm)    {tr:8.3f} s   FID {b:.9f}")
    print(f"  speed-up {tr / to:.1f}x, relative difference {abs(a - b) / abs(b):.2e}")


def bench_features(weights, n_images, batch_size, size):
    from PIL import Image
    from pytorch_fid.fid_score import get_activations

    tmp = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(f"{tmp}/{i:05d}.png")
    files = sorted(os.path.join(tmp, f) for f in os.listdir(tmp))
    ref_model = pytorch_fid_model(weights)
    model = common.load_fid_inception(weights, "cpu")
    # Warm-up on one batch each (oneDNN picks its kernels on the first call).
    get_activations(files[:batch_size], ref_model, batch_size, 2048, "cpu", 0)
    ds = common.build_dataset("folder", root=tmp, img_size=size)

    def ours_features(idx):
        keep = {"i": common.FeatureStats(keep_features=True)}
        common.extract(common.uint8_batches(ds, idx, batch_size), {"i": model}, keep, "cpu", progress=False)
        return keep["i"].features[0]

    ours_features(np.arange(batch_size))
    # Interleaved batch by batch (and alternating who goes first), so that both see the same
    # machine load; both decode the PNGs in the main process (pytorch-fid with num_workers=0).
    times = {"pytorch-fid": 0.0, "ours": 0.0}
    ref, ours = [], []
    for i, start in enumerate(range(0, n_images, batch_size)):
        chunk = files[start:start + batch_size]
        for who in (("pytorch-fid", "ours") if i % 2 == 0 else ("ours", "pytorch-fid")):
            t = time.perf_counter()
            if who == "ours":
                ours.append(ours_features(np.arange(start, start + len(chunk))))
            else:
                ref.append(get_activations(chunk, ref_model, batch_size, 2048, "cpu", 0))
            times[who] += time.perf_counter() - t
    ref, ours = np.concatenate(ref), np.concatenate(ours)
    print(f"Feature extraction, {n_images} PNG files {size}x{size}, batch {batch_size}, "
          f"{torch.get_num_threads()} CPU threads:")
    print(f"  pytorch-fid get_activations  {n_images / times['pytorch-fid']:8.2f} images/s")
    print(f"  common.extract               {n_images / times['ours']:8.2f} images/s "
          f"({times['pytorch-fid'] / times['ours']:.2f}x)")
    print(f"  max |difference| / max |feature| = {np.abs(ours - ref).max() / np.abs(ref).max():.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--size", type=int, default=32, help="side of the benchmark PNGs (CIFAR: 32)")
    p.add_argument("--fid-reps", type=int, default=3)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--skip", default="", help="comma list of parts to skip: fid,features")
    args = p.parse_args()
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        sys.exit("pytorch-fid is not installed: pip install pytorch-fid (benchmark only)")
    if "fid" not in args.skip:
        bench_fid(args.fid_reps)
    if "features" not in args.skip:
        weights = args.inception_weights or random_fid_weights(os.path.join(tempfile.mkdtemp(), "w.pth"))
        bench_features(weights, args.images, args.batch_size, args.size)


if __name__ == "__main__":
    main()
