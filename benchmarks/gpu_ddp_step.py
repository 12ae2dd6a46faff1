"""One DistributedDataParallel training step, launched by torchrun (tests/test_gpu.py::test_ddp_step_through_torchrun).

    torchrun --standalone --nproc_per_node=N benchmarks/gpu_ddp_step.py --backend nccl --out ddp.json

The process group is joined explicitly (lesionlab's init_distributed only joins for WORLD_SIZE > 1, and one
GPU gives WORLD_SIZE 1); each rank trains on different data, then rank 0 checks that the replicas still agree.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from lesionlab import models, runtime
from lesionlab.training.fit import train_one_epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["nccl", "gloo"], required=True)
    ap.add_argument("--arch", default="resnext101_32x4d")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dist.init_process_group(backend=a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if a.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model, _ = models.create_model(a.arch, pretrained="none")
    model = runtime.prepare_model(model, device, channels_last=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(rank)  # each rank sees different data
    ds = torch.utils.data.TensorDataset(torch.randn(8, 3, a.size, a.size, generator=g),
                                        torch.randint(0, 7, (8,), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, pin_memory=device.type == "cuda")
    before = torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    loss = train_one_epoch(ddp, torch.nn.CrossEntropyLoss(), opt, loader, device,
                           amp_dtype=torch.bfloat16 if device.type == "cuda" else None, max_steps=1, progress=False)
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        result = {"backend": dist.get_backend(), "world_size": world, "device": str(device), "loss": loss,
                  "replicas_in_sync": all(torch.equal(gathered[0], t) for t in gathered),
                  "weights_changed": not torch.equal(before, flat.cpu())}
        with open(a.out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
