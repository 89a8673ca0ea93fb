"""evaluate.py: the metrics of the three papers from the command line.

The definitions live in common.py, section 7 ("Metrics"); README ("Evaluation") says which
features and sample counts each number uses. This file parses arguments, streams inputs into
those functions, prints a table and writes the numbers to `--json PATH`.

    images DIR --real SRC     image metrics of a folder of generated images (--metrics fid,is,...)
    stats SRC --out F.npz     FID statistics (mu/sigma as pytorch-fid writes them, plus features)
    fid SRC1 SRC2             FID of two sources (pytorch-fid's own command line)
    points F.npy --dataset D  2-D mode coverage and within-mode spread of (N, 2) samples (ring, grid)
    classifier --dataset D    train and calibrate the stacked-(Fashion-)MNIST mode counter
    modes SAMPLES --classifier F --dataset D
                              calibrated mode count of stacked samples (.npy or a PNG folder)
    ckpt CKPT --n N           sample any method's checkpoint (its script's `load_sampler`) and
                              evaluate as its script does (2-D: its metrics.json, exactly, at --n =
                              its --eval-samples); --save-samples DIR keeps the PNGs scored

A source SRC is an .npz statistics file, a dataset name, or a folder. Every folder, real or
generated, is read as the `folder` dataset (centre square crop, resized to --img-size; default
the size of its first image, so equal square images are used as they are, as pytorch-fid reads
them). Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import torch

import common

# The keys of the JSON file, in the order the table prints them.
JSON_KEYS = ("fid", "is_mean", "is_std", "mode_score", "kid_mean", "kid_std", "precision", "recall",
             "f8", "f1_8", "ivar_mean", "ivar_std", "modes", "hq_fraction", "reverse_kl",
             "reverse_kl_hq", "std_ratio_median", "std_ratio_min", "std_ratio_max",
             "centre_offset_median", "centre_offset_max", "mmd2", "mmd2_real",
             "counted_fraction", "modes_raw", "kl_raw", "non_finite", "accuracy")


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
        if isinstance(v, dict):
            for name, text in v.items():
                print(f"{(k if name == next(iter(v)) else ''):<{width}}  {name}: {text}")
            continue
        print(f"{k:<{width}}  {f'{v:.6g}' if isinstance(v, float) else v}")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        common.write_json(json_path, results)
    return results


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
def _first_image_size(folder):
    from PIL import Image

    files, _ = common.list_images(folder)
    try:
        with Image.open(files[0]) as im:
            return min(im.size)
    except Exception as err:
        raise common.UsageError(f"cannot read image {files[0]} ({type(err).__name__})") from None


def _source(src, args, what, img_size=None):
    """An .npz path, or the real_stats keywords of a dataset name or a folder."""
    if src.endswith(".npz"):
        if not os.path.isfile(src):
            raise common.UsageError(f"{what} {src}: no such statistics file")
        return src
    if os.path.isdir(src):
        size = args.img_size or img_size or _first_image_size(src)
        # A folder may hold generated images, rewritten under the same names: cached only when asked.
        return dict(dataset="folder", root=src, split="train", img_size=size, n=args.n_real,
                    seed=args.subset_seed, cache=args.cache_folders and not args.no_cache)
    if src in common.DATASETS:
        return dict(dataset=src, root=args.data_root, split=args.split, img_size=args.img_size or img_size,
                    n=args.n_real, seed=args.subset_seed, download=args.download)
    raise common.UsageError(f"{what} {src} is neither a .npz file, a folder of images nor a "
                            f"dataset name ({', '.join(common.DATASETS)})")


def _stats(src, net, args):
    """Inception statistics of a source (an .npz is read, anything else computed or cached)."""
    if isinstance(src, str):
        return common.load_stats(src)
    src = dict(src)
    cache = src.pop("cache", not args.no_cache)
    return common.real_stats(net, **src, device=args.device, batch_size=args.batch_size,
                             feature_rows=args.feature_rows, cache=cache,
                             cache_dir=args.stats_cache, progress=not args.quiet)


def _metric_kw(args):
    return dict(device=args.device, inception_weights=args.inception_weights,
                vgg_weights=args.vgg_weights, pr_features=args.pr_features,
                kid_subset_size=args.kid_subset_size, feature_rows=args.feature_rows,
                batch_size=args.batch_size, progress=not args.quiet, cache=not args.no_cache,
                cache_dir=args.stats_cache)


# ------------------------------------------------------------------------------------------------
# Sub-commands
# ------------------------------------------------------------------------------------------------
def cmd_images(args):
    metrics = common.parse_metrics(args.metrics)
    size = args.img_size or _first_image_size(args.dir)
    gen = common.build_dataset("folder", root=args.dir, img_size=size)
    idx = common.subset_indices(len(gen), args.n, args.subset_seed)
    real = _source(args.real, args, "--real", size)
    if isinstance(real, str):                          # a stats file that cannot serve: fail now
        common.check_real_stats(common.load_stats(real), metrics, args.pr_features)
    batches = common.uint8_batches(gen, idx, args.batch_size)
    results = common.image_metrics(batches, len(idx), metrics, real, **_metric_kw(args))
    return report(results, args.json, f"{len(idx)} images in {args.dir} vs {args.real}")


def cmd_stats(args):
    if args.src.endswith(".npz"):
        raise common.UsageError(f"{args.src} already is a statistics file")
    if not args.out.endswith(".npz"):
        raise common.UsageError(f"--out {args.out} must end with .npz")
    src = _source(args.src, args, "source")
    stats = _stats(src, common.load_fid_inception(args.inception_weights, args.device), args)
    common.save_stats(args.out, stats)
    return report({"n": int(stats["n"]), "out": args.out}, args.json, f"statistics of {args.src}")


def cmd_fid(args):
    srcs = [_source(s, args, "source") for s in args.src]
    model = None
    if any(not isinstance(s, str) for s in srcs):
        model = common.load_fid_inception(args.inception_weights, args.device)
    a, b = (_stats(s, model, args) for s in srcs)
    value = common.fid_from_stats(a["mu"], a["sigma"], b["mu"], b["sigma"])
    print(f"FID: {value}")
    return report({"fid": value}, args.json)


def _load_array(path, what):
    if not os.path.isfile(path):
        raise common.UsageError(f"{path}: no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise common.UsageError(f"cannot read {path} as a .npy array ({type(err).__name__})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise common.UsageError(f"{path} does not hold a numeric {what} array (.npy)")
    return array


def cmd_points(args):
    points = _load_array(args.file, "(N, 2)")
    results = common.mode_metrics_2d(points, args.dataset, args.data_std)
    return report(results, args.json, f"{len(points)} points vs {args.dataset}")


def cmd_classifier(args):
    meta = common.train_mode_classifier(
        args.dataset, args.out, root=args.data_root, device=args.device, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, download=args.download,
        calibration_samples=args.calibration_samples,
        log=(lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True)))
    print(f"saved {args.out}: test accuracy {meta['test_accuracy']:.4f}, threshold "
          f"{meta['threshold']} (held-out error {meta['held_out_error']:.4f} on the "
          f"{meta['held_out_accepted']:.1%} of channels it accepts), SHA-256 {meta['sha256']}, "
          f"{common.format_duration(meta['seconds'])}")
    print("calibration (stacked test images covering K known modes; the true KL is that of the drawn "
          "triplets; rows 1-3 tuned the counter, the rest check it):")
    print("true modes | weights | seed | samples | modes | reverse KL | true KL | counted | raw modes | raw KL")
    for r in meta["calibration"]:
        kl = "-" if r["reverse_kl"] is None else f"{r['reverse_kl']:.3f}"
        print(f"{r['true_modes']:>10} | {'Zipf' if r['zipf'] else 'equal':>7} | {r['seed']:>4} | "
              f"{r['samples']:>7} | {r['modes']:>5} | {kl:>10} | {r['true_reverse_kl']:>7.3f} | "
              f"{r['counted_fraction']:.3f} | {r['modes_raw']:>9} | {r['kl_raw']:.3f}")
    return report({"accuracy": meta["test_accuracy"], "threshold": meta["threshold"],
                   "sha256": meta["sha256"], "seconds": meta["seconds"], "calibration": meta["calibration"]},
                  args.json, f"mode classifier on {args.dataset} (test split)")


def _stacked_samples(path):
    """uint8 or [-1, 1] stacked samples from an .npy file (N, 3, H, W) or a folder of PNGs."""
    if os.path.isdir(path):
        size = _first_image_size(path)
        ds = common.build_dataset("folder", root=path, img_size=size)
        return torch.cat(list(common.uint8_batches(ds, np.arange(len(ds)), 500)))
    x = _load_array(path, "(N, 3, H, W)")
    if x.ndim != 4 or x.shape[1] != 3:
        raise common.UsageError(f"{path} holds an array of shape {x.shape}, not (N, 3, H, W)")
    finite = x[np.isfinite(x)] if x.dtype.kind == "f" else x        # NaN / inf: counted, not refused
    if x.dtype != np.uint8 and finite.size and np.abs(finite).max() > 1.0:
        raise common.UsageError(f"{path}: float samples must lie in [-1, 1] (or give uint8 0..255)")
    return torch.from_numpy(np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32)))


def cmd_modes(args):
    classifier = common.load_mode_classifier(args.classifier, args.device, args.dataset)
    x = _stacked_samples(args.samples)
    results = common.stacked_mode_metrics(x, classifier, args.device)
    return report(results, args.json, f"{len(x)} samples of {args.samples} ({args.dataset})")


METHOD_SCRIPTS = {"maem_gan": "maem_gan", "invert_gan": "invert_gan", "pgm_gan": "pgm_gan"}


class _PngWriter:
    """on_batch callback of common.extract: writes the very uint8 images that are scored."""

    def __init__(self, folder):
        from PIL import Image

        self.image, self.folder, self.count = Image, folder, 0
        os.makedirs(folder, exist_ok=True)

    def __call__(self, batch):
        for x in batch:
            arr = x.permute(1, 2, 0).numpy()
            self.image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(
                os.path.join(self.folder, f"{self.count:06d}.png"))
            self.count += 1


def cmd_ckpt(args):
    ckpt = common.load_checkpoint(args.ckpt)
    method = (args.method or ckpt.get("method") or "").replace("-", "_")
    if method not in METHOD_SCRIPTS:
        raise common.UsageError(f"{args.ckpt} names no known method ({method or 'none'}); "
                                f"pass --method {'|'.join(METHOD_SCRIPTS)}")
    saved = ckpt.get("args") or {}
    del ckpt
    # A method's preset name (e.g. MaEM's "animeface") may differ from its common.py dataset
    # ("folder"); scripts that have presets store the latter as "data_name".
    dataset = args.dataset or saved.get("data_name") or saved.get("dataset")
    if dataset not in common.DATASETS:
        raise common.UsageError(f"cannot tell the dataset of {args.ckpt}; pass --dataset")
    kind = common.dataset_info(dataset)["kind"]
    stacked = dataset.startswith("stacked")
    if args.n is None:
        args.n = common.STACKED_SAMPLES if stacked else 10_000
    # Stacked data: mode counts by default; image metrics when --metrics or --real asks for them.
    images_asked = args.metrics_given or args.real is not None
    if kind == "points" and images_asked:
        raise common.UsageError(f"--metrics / --real: {dataset} is 2-D data, scored by mode coverage "
                                f"(modes, hq_fraction, reverse_kl) with no image metrics; drop them")
    if stacked and not args.classifier and not images_asked:
        raise common.UsageError("stacked datasets need --classifier FILE for the mode count (train one "
                                "with evaluate.py classifier), or --metrics for image metrics only")
    metrics = common.parse_metrics(args.metrics) if kind == "image" else []
    real = None
    if args.real is not None:
        real = _source(args.real, args, "--real", saved.get("img_size"))
    elif kind == "image" and (not stacked or images_asked):
        # The run's own training images: its dataset, data root, split and resolution.
        real = dict(dataset=dataset, root=args.data_root or saved.get("data_root"),
                    split=args.split if args.split_given else saved.get("split", "train"),
                    img_size=args.img_size or saved.get("img_size"), n=args.n_real,
                    seed=args.subset_seed, download=args.download)
    if isinstance(real, str):
        common.check_real_stats(common.load_stats(real), metrics, args.pr_features)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        script = importlib.import_module(METHOD_SCRIPTS[method])
    except ModuleNotFoundError:
        raise common.UsageError(f"{METHOD_SCRIPTS[method]}.py is not in this checkout") from None
    sample = script.load_sampler(args.ckpt, args.device)
    torch.manual_seed(args.seed)

    def batches(bs):
        for i in range(0, args.n, bs):
            with torch.no_grad():
                yield sample(min(bs, args.n - i))

    title = f"{args.n} samples of {args.ckpt} ({method}, {dataset})"
    if kind == "points":
        # The run's metrics.json drew its points the same way: --n its --eval-samples, --seed 0.
        points = common.sample_points(sample, args.n, args.device, args.seed)
        data_std = args.data_std if args.data_std is not None else saved.get("data_std")
        results = common.mode_metrics_2d(points.numpy(), dataset, data_std)
        return report(dict(results, **getattr(sample, "metrics", dict)()), args.json, title)
    writer = _PngWriter(args.save_samples) if args.save_samples else None
    if stacked and real is None:
        classifier = common.load_mode_classifier(args.classifier, args.device, dataset)

        def written(bs):
            for b in batches(bs):
                b = common.to_uint8(b.detach().cpu())
                if writer:
                    writer(b)
                yield b
        return report(common.stacked_mode_metrics(written(500), classifier, args.device), args.json, title)
    results = {}
    if stacked and args.classifier:                    # mode count and image metrics: two passes
        classifier = common.load_mode_classifier(args.classifier, args.device, dataset)
        results.update(common.stacked_mode_metrics(batches(500), classifier, args.device))
    stacked_protocol = results.pop("protocol", None)
    results.update(common.image_metrics(batches(args.batch_size), args.n, metrics, real,
                                        on_batch=writer, **_metric_kw(args)))
    if stacked_protocol:
        results["protocol"]["modes"] = stacked_protocol
    return report(results, args.json, title)


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise common.argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise common.argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser():
    p = common.ArgParser(description=__doc__.split("\n\n")[0],
                         formatter_class=common.argparse.RawDescriptionHelpFormatter,
                         epilog="Run `evaluate.py SUB-COMMAND --help` for its flags.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="SUB-COMMAND")

    def flags(sp, inception=True, real=True):
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = CUDA when visible, else CPU")
        sp.add_argument("--json", default=None, metavar="PATH", help="write the results to this JSON file")
        sp.add_argument("--quiet", action="store_true", help="no progress lines")
        if inception:
            sp.add_argument("--inception-weights", default=None, metavar="PATH",
                            help="FID Inception state dict (default: torch.hub cache, else download)")
            sp.add_argument("--batch-size", type=_positive_int, default=50, help="images per forward pass")
        if real:
            g = sp.add_argument_group("real images (a source that is a dataset name or a folder)")
            g.add_argument("--data-root", default=None, help=common.DATA_ROOT_HELP)
            g.add_argument("--split", default=None, help="train (default), test, all, ... (common.build_dataset)")
            g.add_argument("--img-size", type=_positive_int, default=None,
                           help="resolution (default: the dataset's, a folder's first image, a checkpoint's)")
            g.add_argument("--download", action="store_true", help="let torchvision download the dataset")
            g.add_argument("--n-real", type=_positive_int, default=None,
                           help="a random subset of N real images (seed --subset-seed)")
            g.add_argument("--subset-seed", type=int, default=0, help="seed of the --n / --n-real subsets")
            g.add_argument("--feature-rows", type=_positive_int, default=common.FEATURE_ROWS,
                           help="feature rows kept for KID/PR/PRD (the PR reference uses 50000)")
            g.add_argument("--stats-cache", default=None, metavar="DIR",
                           help="cache of real statistics (default ~/.cache/torch/fid_stats)")
            g.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
            g.add_argument("--cache-folders", action="store_true",
                           help="cache folders' statistics too (keyed by their files' names, sizes and "
                                "mtimes); by default a folder, which may hold generated images, is read afresh")

    def metric_flags(sp):
        sp.add_argument("--metrics", default=None,
                        help=f"comma list of {','.join(common.IMAGE_METRICS)} (default fid,is; "
                             f"stacked checkpoints: none unless given, their mode count needs --classifier)")
        sp.add_argument("--pr-features", default="vgg16", choices=["vgg16", "inception"],
                        help="precision/recall features: VGG-16 fc2 (the reference) or Inception pool3")
        sp.add_argument("--vgg-weights", default=None, metavar="PATH",
                        help="torchvision VGG-16 state dict (default: torch.hub cache, else download)")
        sp.add_argument("--kid-subset-size", type=_positive_int, default=1000,
                        help="KID subset size (torch-fidelity: 1000; needs that many samples)")

    sp = sub.add_parser("images", help="metrics of a folder of generated images")
    sp.add_argument("dir", help="folder of PNG/JPG files (searched recursively)")
    sp.add_argument("--real", required=True, help="real images: dataset name, folder or .npz statistics")
    sp.add_argument("--n", type=_positive_int, default=None, help="a random subset of N generated images")
    metric_flags(sp)
    flags(sp)
    sp.set_defaults(fn=cmd_images)

    sp = sub.add_parser("stats", help="FID statistics (.npz) of a folder or a dataset")
    sp.add_argument("src", help="folder of images or dataset name")
    sp.add_argument("--out", required=True, help="output .npz (pytorch-fid reads its mu/sigma)")
    flags(sp)
    sp.set_defaults(fn=cmd_stats)

    sp = sub.add_parser("fid", help="FID of two sources (folders, datasets, .npz statistics)")
    sp.add_argument("src", nargs=2, help="folders of images, dataset names or .npz statistics")
    flags(sp)
    sp.set_defaults(fn=cmd_fid)

    sp = sub.add_parser("points", help="2-D mode coverage of (N, 2) samples")
    sp.add_argument("file", help=".npy array of shape (N, 2)")
    sp.add_argument("--dataset", required=True, choices=["ring", "grid"])
    sp.add_argument("--data-std", type=float, default=None,
                    help="per-mode std (default 0.01 ring, 0.05 grid; high quality = within 3 std)")
    flags(sp, inception=False, real=False)
    sp.set_defaults(fn=cmd_points)

    sp = sub.add_parser("classifier", help="train and calibrate the stacked-MNIST mode classifier")
    sp.add_argument("--dataset", required=True, choices=["mnist", "fashion-mnist"])
    sp.add_argument("--out", required=True, help="where to save the classifier (.pt)")
    sp.add_argument("--data-root", default=None, help=common.DATA_ROOT_HELP)
    sp.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    sp.add_argument("--epochs", type=_positive_int, default=12, help="12 gives the README's 92.35 %% classifier")
    sp.add_argument("--batch-size", type=_positive_int, default=128)
    sp.add_argument("--calibration-samples", type=_positive_int, default=common.STACKED_SAMPLES,
                    help="samples per calibration row (PacGAN's 25,600, as every stacked count)")
    sp.add_argument("--seed", type=int, default=0)
    flags(sp, inception=False, real=False)
    sp.set_defaults(fn=cmd_classifier)

    sp = sub.add_parser("modes", help="calibrated mode count of stacked (Fashion-)MNIST samples")
    sp.add_argument("samples", help=".npy (N, 3, H, W) in [-1, 1] or uint8, or a folder of PNGs")
    sp.add_argument("--dataset", required=True, choices=["stacked-fashion-mnist", "stacked-mnist"])
    sp.add_argument("--classifier", required=True, help="a classifier from `evaluate.py classifier`")
    flags(sp, inception=False, real=False)
    sp.set_defaults(fn=cmd_modes)

    sp = sub.add_parser("ckpt", help="sample from a method's checkpoint and evaluate")
    sp.add_argument("ckpt", help="ckpt.pt of maem_gan.py, invert_gan.py or pgm_gan.py")
    sp.add_argument("--n", type=_positive_int, default=None,
                    help=f"number of samples (default {common.STACKED_SAMPLES:,} on stacked data, as "
                         "the scripts and PacGAN count; 10,000 otherwise)")
    sp.add_argument("--method", default=None, help="override the checkpoint's method name")
    sp.add_argument("--dataset", default=None, help="override the checkpoint's dataset")
    sp.add_argument("--real", default=None,
                    help="real images for image metrics (default: the run's training images, from "
                         "its dataset, data root, split and resolution)")
    sp.add_argument("--classifier", default=None, help="mode classifier (stacked datasets)")
    sp.add_argument("--data-std", type=float, default=None, help="2-D per-mode std override")
    sp.add_argument("--seed", type=int, default=common.EVAL_SEED,
                    help="seed of the sampling noise (2-D: the default with --n = the run's "
                         "--eval-samples reproduces its metrics.json, on the same device)")
    sp.add_argument("--save-samples", default=None, metavar="DIR",
                    help="write the scored images to DIR as PNGs (pytorch-fid on them gives our FID)")
    metric_flags(sp)
    flags(sp)
    sp.set_defaults(fn=cmd_ckpt)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.device = common.pick_device(args.device)
    if hasattr(args, "metrics"):
        args.metrics_given = args.metrics is not None
        args.metrics = args.metrics or "fid,is"
    if hasattr(args, "split"):
        args.split_given = args.split is not None
        args.split = args.split or "train"
    return args.fn(args)


if __name__ == "__main__":
    common.run_cli(main)
