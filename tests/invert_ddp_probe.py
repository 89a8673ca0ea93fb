"""Run under torchrun by tests/test_invert_gan.py: InvertGAN's Gaussian statistics on a batch split
over the ranks, against one process on the whole batch.

Every rank builds the same global batch of codes (B, l) and keeps its own B / world rows;
batch_gaussian on those rows must give the mean and covariance of all B rows, every Gaussian
loss the one-process value, and each rank's rows world_size x their one-process gradient (see
invert_gan.batch_gaussian). Rank 0 writes OUT/gauss.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import common  # noqa: E402
import invert_gan  # noqa: E402

KINDS = {"pnorm": 3.0, "w2": 2.0, "kl": 2.0, "w2-1d": 2.0}     # kind -> p (p only matters for pnorm)


def gathered(t):
    parts = [torch.zeros_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def main(out):
    rt = common.setup_runtime("cpu", seed=0)
    g = torch.Generator().manual_seed(7)
    # correlated, off-centre codes: every term of every loss is non-zero
    mix = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.2]], dtype=torch.float64)
    full = torch.randn(12, 3, generator=g, dtype=torch.float64) @ mix + 0.3
    n = len(full) // rt.world_size
    result = {"world_size": rt.world_size}
    mine = full[rt.rank * n:(rt.rank + 1) * n]
    mu, sigma = invert_gan.batch_gaussian(mine)
    result["mu_err"] = float((mu - full.mean(0)).abs().max())
    result["sigma_err"] = float((sigma - torch.cov(full.T)).abs().max())
    for kind, p in KINDS.items():
        ref = full.clone().requires_grad_()               # one process: plain statistics, no gather
        ref_loss = invert_gan.gaussian_loss(kind, ref.mean(0), torch.cov(ref.T), p=p)
        ref_loss.backward()
        part = mine.clone().requires_grad_()
        loss = invert_gan.gaussian_loss(kind, *invert_gan.batch_gaussian(part), p=p)
        loss.backward()
        values = gathered(loss.detach().reshape(1))
        result[kind] = {"value_err": float((values - ref_loss.detach()).abs().max()),
                        "value": ref_loss.item(),
                        "grad_ratio_err": float((gathered(part.grad) - rt.world_size * ref.grad).abs().max()),
                        "grad_scale": float(ref.grad.abs().max())}
    if rt.is_main:
        with open(os.path.join(out, "gauss.json"), "w") as f:
            json.dump(result, f)
    common.shutdown(rt)


if __name__ == "__main__":
    main(sys.argv[1])
