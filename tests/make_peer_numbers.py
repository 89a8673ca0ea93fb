"""Maker of tests/data/peer_numbers.npz: pytorch-fid's and torch-fidelity's numbers on small fixed
inputs with fixed random weights, pinned so that every test run compares ours with theirs without
either being installed (test_metrics.py, "peers"). Not collected by pytest (no test_ prefix).

Run once, in a throwaway venv that has the peers (never a project requirement):
    python -m venv /work/peer-venv && echo "$(project venv site-packages)" > .../main-venv.pth
    /work/peer-venv/bin/pip install --no-deps pytorch-fid==0.3.0 torch-fidelity==0.4.0 tqdm
    /work/peer-venv/bin/python tests/make_peer_numbers.py

Inputs: 10 "generated" and 10 "real" uint8 images, 3x24x24 (numpy default_rng(29), smooth blobs
plus noise so that features are not all alike), stored in the file. Weights: the FID Inception of
bench_metrics.random_fid_weights(seed 0) and torchvision's VGG-16 initialised after
torch.manual_seed(0) (random_vgg16_weights below); the tests rebuild both.
"""

import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_metrics import random_fid_weights  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "peer_numbers.npz")
N, SIZE = 10, 24


def peer_inputs(seed=29):
    """(generated, real) uint8 (N, 3, SIZE, SIZE): smooth random blobs plus pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    sets = []
    for shift in (0.0, 0.25):
        imgs = []
        for _ in range(N):
            cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.4)]
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2)
            colour = rng.uniform(0, 1, 3) + shift
            img = blob[None] * colour[:, None, None] * 200 + rng.normal(0, 20, (3, SIZE, SIZE)) + 30
            imgs.append(np.clip(img, 0, 255).astype(np.uint8))
        sets.append(np.stack(imgs))
    return sets[0], sets[1]


def random_vgg16_weights(path, seed=0):
    """torchvision's VGG-16 with its own random initialisation after torch.manual_seed(seed)."""
    import torchvision

    torch.manual_seed(seed)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return path


def main():
    from PIL import Image
    from pytorch_fid import fid_score, inception as pfi
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    torch.set_num_threads(1)
    gen, real = peer_inputs()
    tmp = tempfile.mkdtemp()
    w_inc = random_fid_weights(os.path.join(tmp, "inc.pth"))
    w_vgg = random_vgg16_weights(os.path.join(tmp, "vgg.pth"))
    out = {"gen": gen, "real": real}

    # pytorch-fid on PNG files (its own path: PIL, ToTensor, its InceptionV3).
    folders = []
    for name, arr in (("gen", gen), ("real", real)):
        d = os.path.join(tmp, name)
        os.makedirs(d)
        for i, x in enumerate(arr):
            Image.fromarray(x.transpose(1, 2, 0)).save(os.path.join(d, f"{i:02d}.png"))
        folders.append(sorted(os.path.join(d, f) for f in os.listdir(d)))
    pfi.load_state_dict_from_url = lambda *a, **k: torch.load(w_inc, map_location="cpu")
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    acts = [fid_score.get_activations(f, model, batch_size=5, dims=2048, device="cpu", num_workers=0)
            for f in folders]
    stats = [(a.mean(0), np.cov(a, rowvar=False)) for a in acts]
    out["pytorch_fid_fid"] = fid_score.calculate_frechet_distance(*stats[0], *stats[1])
    out["pytorch_fid_features_gen"] = acts[0][:, :64].astype(np.float32)      # a slice keeps the file small

    # torch-fidelity: its InceptionV3 (TF1-style resize, (x - 128) / 128) and VGG-16 fc2_relu.
    inc = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=w_inc)
    vgg = FeatureExtractorVGG16("vgg16", ["fc2_relu"], feature_extractor_weights_path=w_vgg)
    with torch.no_grad():
        f_inc = [inc(torch.from_numpy(a))[0].double() for a in (gen, real)]
        f_vgg = [vgg(torch.from_numpy(a))[0].double() for a in (gen, real)]
    kid = kid_features_to_metric(f_inc[0], f_inc[1], kid_subsets=100, kid_subset_size=N,
                                 kid_degree=3, kid_gamma=None, kid_coef0=1, verbose=False)
    precision, recall = calculate_precision_recall_full(f_vgg[0], f_vgg[1], neighborhood=3, batch_size=10000)
    out.update(torch_fidelity_kid=kid["kernel_inception_distance_mean"],
               torch_fidelity_precision=precision, torch_fidelity_recall=recall,
               torch_fidelity_inception_gen=f_inc[0].float().numpy(),
               torch_fidelity_inception_real=f_inc[1].float().numpy(),
               torch_fidelity_vgg_gen=f_vgg[0].float().numpy(), torch_fidelity_vgg_real=f_vgg[1].float().numpy(),
               versions=np.array(f"pytorch-fid 0.3.0, torch-fidelity {torch_fidelity.__version__}, "
                                 f"torch {torch.__version__}"))
    np.savez_compressed(OUT, **out)
    print({k: v for k, v in out.items() if np.ndim(v) == 0})


if __name__ == "__main__":
    main()
