"""evaluate.py: the metrics of the three papers from the command line.

The definitions live in common.py, section 7 ("Metrics"); METHODS.md ("Metrics") says why each
one is computed the way it is. This file only parses arguments, streams inputs into those
functions, prints a table and writes the numbers to `--json PATH`.

Sub-commands
    images DIR --real DIR|NPZ|DATASET --metrics fid,is,ms,kid,pr,prd,ivar
                    metrics of a folder of generated PNG/JPG files
    stats SRC --out FILE.npz
                    FID statistics of a folder or a dataset (mu/sigma as pytorch-fid writes them,
                    plus the class marginal and 10k features for the Mode Score, KID, PR, PRD)
    fid SRC1 SRC2   FID of two folders or .npz statistics files (pytorch-fid's own command line)
    points FILE.npy --dataset ring|grid
                    mode coverage of (N, 2) samples: modes, high-quality fraction, reverse KL
    classifier --dataset mnist|fashion-mnist --out FILE
                    train the classifier that counts stacked-(Fashion-)MNIST modes
    ckpt CKPT --n N --metrics ...
                    sample N images/points from any method's checkpoint (its script's
                    `load_sampler`) and evaluate them

Examples
    python evaluate.py stats cifar10 --split train --out stats/cifar10-train.npz
    python evaluate.py images samples/ --real stats/cifar10-train.npz --metrics fid,is,kid --json m.json
    python evaluate.py fid samples/ stats/cifar10-train.npz
    python evaluate.py points samples.npy --dataset grid
    python evaluate.py classifier --dataset fashion-mnist --out cls/fmnist.pt
    python evaluate.py ckpt runs/pgm_gan-cifar10-0/ckpt.pt --n 10000 --metrics fid,is

Inception weights: `--inception-weights PATH`, else torch.hub's cache
(~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth, shared with pytorch-fid),
else a download from pytorch-fid's release, whose SHA-256 is checked.
Bad input (empty folder, unreadable image, stats file without mu/sigma, wrong weights file):
one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import numpy as np
import torch

import common

# The keys of the JSON file, in the order the table prints them.
JSON_KEYS = ("fid", "is_mean", "is_std", "mode_score", "kid_mean", "kid_std", "precision", "recall",
             "f8", "f1_8", "ivar_mean", "ivar_std", "ivar_eq15", "modes", "hq_fraction",
             "reverse_kl", "accuracy")


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def report(results, json_path=None, title=None):
    """Print `results` as a two-column table; write them to `json_path` if given."""
    keys = [k for k in JSON_KEYS if k in results] + [k for k in results if k not in JSON_KEYS]
    if title:
        print(title)
    width = max(len(k) for k in keys) if keys else 0
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 12}")
    for k in keys:
        v = results[k]
        text = f"{v:.6g}" if isinstance(v, float) else str(v)
        print(f"{k:<{width}}  {text}")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        common.write_json(json_path, results)
    return results


# ------------------------------------------------------------------------------------------------
# Helpers shared by the sub-commands
# ------------------------------------------------------------------------------------------------
def _device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise common.UsageError("--device cuda was asked for but no CUDA device is visible")
    return torch.device(name)


def _model(args, device):
    return common.load_fid_inception(args.inception_weights, device)


def _dataset_kw(args):
    return dict(root=args.data_root, split=args.split, img_size=args.img_size,
                download=args.download, n=args.n_real, cache=not args.no_cache,
                cache_dir=args.stats_cache, progress=not args.quiet)


def _check_source(src, what):
    """Fail early (before any long pass) on a source that is none of: .npz, folder, dataset."""
    if src.endswith(".npz"):
        if not os.path.isfile(src):
            raise common.UsageError(f"{what} {src}: no such statistics file")
        return "npz"
    if os.path.isdir(src):
        common.image_files(src)                       # raises on an empty folder
        return "folder"
    if src in common.DATASETS:
        return "dataset"
    raise common.UsageError(f"{what} {src} is neither a .npz file, a folder of images nor a "
                            f"dataset name ({', '.join(common.DATASETS)})")


def _real_stats(src, args, model, device):
    kind = _check_source(src, "--real")
    if kind == "npz":
        return common.resolve_real(src, model, device)
    if kind == "folder":
        return common.folder_stats(src, model, device, args.batch_size, keep_features=True,
                                   progress=not args.quiet, n=args.n_real)
    return common.dataset_stats(src, model, device, batch_size=args.batch_size, **_dataset_kw(args))


# ------------------------------------------------------------------------------------------------
# Sub-commands
# ------------------------------------------------------------------------------------------------
def cmd_images(args):
    metrics = common.parse_metrics(args.metrics)
    files = common.image_files(args.dir)[:args.n]
    _check_source(args.real, "--real")
    if args.real.endswith(".npz"):                    # a stats file that cannot serve: fail now
        _needs_check(common.load_stats(args.real), metrics)
    device = _device(args.device)
    model = _model(args, device)
    real = _real_stats(args.real, args, model, device)
    gen = common.FeatureStats(keep_features=bool({"kid", "pr", "prd"} & set(metrics)),
                              keep_logits=bool({"is", "ms", "ivar"} & set(metrics)))
    common.extract(common._prefetched(common.file_batches(files, args.batch_size)), model, device,
                   gen, total=len(files), progress=not args.quiet, label="inception images")
    results = common.scores_from_stats(gen.result(), real, metrics, device)
    return report(results, args.json, f"{len(files)} images in {args.dir} vs {args.real}")


def _needs_check(real, metrics):
    # The same checks scores_from_stats makes, before the generated images are read.
    needs = {"kid", "pr", "prd"} & set(metrics)
    if needs and "features" not in real:
        raise common.UsageError(f"{', '.join(sorted(needs))} need real features, which this "
                                "statistics file lacks: give a folder, a dataset name, or a file "
                                "written by evaluate.py stats")
    if "ms" in metrics and "p_y" not in real:
        raise common.UsageError("the Mode Score needs the real class marginal, which this "
                                "statistics file lacks: give a folder, a dataset name, or a file "
                                "written by evaluate.py stats")


def cmd_stats(args):
    kind = _check_source(args.src, "source")
    if kind == "npz":
        raise common.UsageError(f"{args.src} already is a statistics file")
    if not args.out.endswith(".npz"):
        raise common.UsageError(f"--out {args.out} must end with .npz")
    device = _device(args.device)
    model = _model(args, device)
    stats = _real_stats(args.src, args, model, device)
    common.save_stats(args.out, stats)
    return report({"n": int(stats["n"]), "out": args.out}, args.json, f"statistics of {args.src}")


def cmd_fid(args):
    kinds = [_check_source(s, "source") for s in args.src]
    model = device = None
    if any(k != "npz" for k in kinds):
        device = _device(args.device)
        model = _model(args, device)
    stats = [_real_stats(s, args, model, device) if k != "npz" else common.load_stats(s)
             for s, k in zip(args.src, kinds)]
    value = common.fid_from_stats(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])
    print(f"FID: {value}")
    return report({"fid": value}, args.json)


def cmd_points(args):
    if not os.path.isfile(args.file):
        raise common.UsageError(f"{args.file}: no such file")
    try:
        points = np.load(args.file, allow_pickle=False)
    except Exception as err:
        raise common.UsageError(f"cannot read {args.file} as a .npy array ({type(err).__name__})") from None
    if not isinstance(points, np.ndarray) or points.dtype.kind not in "fiu":
        raise common.UsageError(f"{args.file} does not hold a numeric (N, 2) array (.npy)")
    results = common.mode_metrics_2d(points, args.dataset, args.data_std)
    return report(results, args.json, f"{len(points)} points vs {args.dataset}")


def cmd_classifier(args):
    device = _device(args.device)
    acc = common.train_mode_classifier(args.dataset, args.out, root=args.data_root, device=device,
                                       epochs=args.epochs, batch_size=args.batch_size,
                                       seed=args.seed, download=args.download,
                                       log=(lambda s: None) if args.quiet else
                                       (lambda s: print(s, file=sys.stderr, flush=True)))
    print(f"saved {args.out}")
    return report({"accuracy": acc}, args.json, f"mode classifier on {args.dataset} (test split)")


METHOD_SCRIPTS = {"maem_gan": "maem_gan", "invert_gan": "invert_gan", "pgm_gan": "pgm_gan"}


def cmd_ckpt(args):
    ckpt = common.load_checkpoint(args.ckpt)
    method = (args.method or ckpt.get("method") or "").replace("-", "_")
    if method not in METHOD_SCRIPTS:
        raise common.UsageError(f"{args.ckpt} names no known method ({method or 'none'}); "
                                f"pass --method {'|'.join(METHOD_SCRIPTS)}")
    saved_args = ckpt.get("args") or {}
    # A method's preset name (e.g. MaEM's "animeface") may differ from its common.py dataset
    # ("folder"); scripts that have presets store the latter as "data_name".
    dataset = args.dataset or saved_args.get("data_name") or saved_args.get("dataset")
    if dataset not in common.DATASETS:
        raise common.UsageError(f"cannot tell the dataset of {args.ckpt}; pass --dataset")
    del ckpt
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        script = importlib.import_module(METHOD_SCRIPTS[method])
    except ModuleNotFoundError:
        raise common.UsageError(f"{METHOD_SCRIPTS[method]}.py is not in this checkout") from None
    if not hasattr(script, "load_sampler"):
        raise common.UsageError(f"{METHOD_SCRIPTS[method]}.py has no load_sampler()")
    device = _device(args.device)
    kind = common.dataset_info(dataset)["kind"]
    if dataset.startswith("stacked") and not args.classifier:
        raise common.UsageError("stacked datasets need --classifier FILE (train one with "
                                "evaluate.py classifier)")
    metrics = common.parse_metrics(args.metrics) if kind == "image" else []
    if kind == "image" and not dataset.startswith("stacked") and args.real is None:
        args.real = dataset                     # real statistics of the training set
    if args.real is not None:
        _check_source(args.real, "--real")
        if args.real.endswith(".npz"):
            _needs_check(common.load_stats(args.real), metrics)
    sample = script.load_sampler(args.ckpt, device)
    torch.manual_seed(args.seed)

    def batches(bs):
        for i in range(0, args.n, bs):
            with torch.no_grad():
                yield sample(min(bs, args.n - i))

    title = f"{args.n} samples of {args.ckpt} ({method}, {dataset})"
    if kind == "points":
        points = torch.cat([b.detach().float().cpu() for b in batches(10_000)])
        data_std = args.data_std if args.data_std is not None else saved_args.get("data_std")
        return report(common.mode_metrics_2d(points.numpy(), dataset, data_std), args.json, title)
    results = {}
    if dataset.startswith("stacked"):
        classifier = common.load_mode_classifier(args.classifier, device)
        results.update(common.stacked_mode_metrics(batches(500), classifier, device))
    if args.real is not None:
        model = _model(args, device)
        real = _real_stats(args.real, args, model, device)
        results.update(common.image_metrics(lambda k: sample(k), args.n, real, metrics, device,
                                            args.batch_size, model=model, progress=not args.quiet))
    return report(results, args.json, title)


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `evaluate.py SUB-COMMAND --help` for its flags.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUB-COMMAND")

    def common_flags(sp, inception=True, real=True):
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = CUDA when visible, else CPU")
        sp.add_argument("--json", default=None, metavar="PATH", help="write the results to this JSON file")
        sp.add_argument("--quiet", action="store_true", help="no progress lines")
        if inception:
            sp.add_argument("--inception-weights", default=None, metavar="PATH",
                            help="FID Inception state dict (default: torch.hub cache, else download)")
            sp.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
        if real:
            g = sp.add_argument_group("datasets (when a source is a dataset name)")
            g.add_argument("--data-root", default=None, help="dataset folder (default ./data/<dataset>)")
            g.add_argument("--split", default="train", help="train, test, all, ... (see common.build_dataset)")
            g.add_argument("--img-size", type=int, default=None, help="resolution (default: the dataset's)")
            g.add_argument("--download", action="store_true", help="let torchvision download the dataset")
            g.add_argument("--n-real", type=int, default=None, help="use only the first N real images")
            g.add_argument("--stats-cache", default=None, metavar="DIR",
                           help="cache of real statistics (default ~/.cache/torch/fid_stats)")
            g.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")

    sp = sub.add_parser("images", help="metrics of a folder of generated images")
    sp.add_argument("dir", help="folder of PNG/JPG files (searched recursively)")
    sp.add_argument("--real", required=True, help="real images: folder, .npz statistics or dataset name")
    sp.add_argument("--metrics", default="fid,is", help=f"comma list of {','.join(common.IMAGE_METRICS)}")
    sp.add_argument("--n", type=int, default=None, help="use only the first N generated images")
    common_flags(sp)
    sp.set_defaults(fn=cmd_images)

    sp = sub.add_parser("stats", help="FID statistics (.npz) of a folder or a dataset")
    sp.add_argument("src", help="folder of images or dataset name")
    sp.add_argument("--out", required=True, help="output .npz (pytorch-fid reads its mu/sigma)")
    common_flags(sp)
    sp.set_defaults(fn=cmd_stats)

    sp = sub.add_parser("fid", help="FID of two folders / .npz statistics files")
    sp.add_argument("src", nargs=2, help="folders of images or .npz statistics (or dataset names)")
    common_flags(sp)
    sp.set_defaults(fn=cmd_fid)

    sp = sub.add_parser("points", help="2-D mode coverage of (N, 2) samples")
    sp.add_argument("file", help=".npy array of shape (N, 2)")
    sp.add_argument("--dataset", required=True, choices=["ring", "grid"])
    sp.add_argument("--data-std", type=float, default=None,
                    help="per-mode std (default 0.01 ring, 0.05 grid; high quality = within 3 std)")
    common_flags(sp, inception=False, real=False)
    sp.set_defaults(fn=cmd_points)

    sp = sub.add_parser("classifier", help="train the stacked-MNIST mode classifier")
    sp.add_argument("--dataset", required=True, choices=["mnist", "fashion-mnist"])
    sp.add_argument("--out", required=True, help="where to save the classifier (.pt)")
    sp.add_argument("--data-root", default=None, help="dataset folder (default ./data/<dataset>)")
    sp.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    sp.add_argument("--epochs", type=int, default=2)
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--seed", type=int, default=0)
    common_flags(sp, inception=False, real=False)
    sp.set_defaults(fn=cmd_classifier)

    sp = sub.add_parser("ckpt", help="sample from a method's checkpoint and evaluate")
    sp.add_argument("ckpt", help="ckpt.pt of maem_gan.py, invert_gan.py or pgm_gan.py")
    sp.add_argument("--n", type=int, default=10_000, help="number of samples")
    sp.add_argument("--metrics", default="fid,is", help=f"image metrics: {','.join(common.IMAGE_METRICS)}")
    sp.add_argument("--method", default=None, help="override the checkpoint's method name")
    sp.add_argument("--dataset", default=None, help="override the checkpoint's dataset")
    sp.add_argument("--real", default=None,
                    help="real images for image metrics (default: the checkpoint's dataset)")
    sp.add_argument("--classifier", default=None, help="mode classifier (stacked datasets)")
    sp.add_argument("--data-std", type=float, default=None, help="2-D per-mode std override")
    sp.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    common_flags(sp)
    sp.set_defaults(fn=cmd_ckpt)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("n", "n_real", "batch_size", "epochs"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise common.UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    return args.fn(args)


if __name__ == "__main__":
    common.run_cli(main)
