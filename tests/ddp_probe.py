"""Run under torchrun by tests/test_common.py: a few DDP steps, then compare weights across ranks.

Each rank reads its own half of every global batch (DistributedSampler via BatchStream) and its
own noise; DDP averages the gradients, so after any number of steps the weights must still be
identical on both ranks. Rank 0 writes the result to OUT/ddp.json.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import common  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    rt = common.setup_runtime("cpu", seed=3)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    init = torch.cat([p.detach().flatten() for p in net.parameters()])
    common.seed_rank(rt, 3)
    ddp_net = rt.wrap(net)
    opt = torch.optim.Adam(ddp_net.parameters(), lr=1e-2)
    stream = common.BatchStream(common.build_dataset("ring", n_points=800), 64, rt, seed=3)
    seen = []
    for _ in range(args.steps):
        x, y = next(stream)
        seen.append(y.tolist())
        noise = torch.randn(x.shape[0], 1)                     # per-rank noise stream
        loss = ((ddp_net(x) - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        rt.backward_step(loss, opt)
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    inits = [torch.zeros_like(init) for _ in range(rt.world_size)]
    finals = [torch.zeros_like(flat) for _ in range(rt.world_size)]
    torch.distributed.all_gather(inits, init)
    torch.distributed.all_gather(finals, flat)
    batches = [None] * rt.world_size
    torch.distributed.all_gather_object(batches, [x.shape[0], noise.sum().item()])
    if rt.is_main:
        result = {
            "world_size": rt.world_size,
            "init_max_diff": max(float((t - inits[0]).abs().max()) for t in inits),
            "final_max_diff": max(float((t - finals[0]).abs().max()) for t in finals),
            "moved": float((finals[0] - inits[0]).abs().max()),
            "per_rank_batch": [b[0] for b in batches],
            "noise_differs": batches[0][1] != batches[1][1],
        }
        with open(os.path.join(args.out, "ddp.json"), "w") as f:
            json.dump(result, f)
    common.shutdown(rt)


if __name__ == "__main__":
    common.run_cli(main)
