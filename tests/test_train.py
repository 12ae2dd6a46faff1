import os
import socket

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from lesionlab import models
from lesionlab.data.split import read_split
from lesionlab.data.subsets import split_frames
from lesionlab.data.tables import read_table
from lesionlab.training.early_stopping import EarlyStopping
from lesionlab.training.fit import fit, train_one_epoch
from lesionlab.training.losses import class_weights


def test_class_weights_inverse_frequency_by_hand():
    y = np.array([0, 0, 0, 1, 2, 2])  # n=6, K=3 present: w = 6/(3*n_c)
    w = class_weights(y, num_classes=4)
    assert np.allclose(w, [6 / 9, 6 / 3, 6 / 6, 0.0])


def test_early_stopping_stops_after_patience():
    es = EarlyStopping(patience=2, min_delta=0.01)
    seq = [1.0, 0.8, 0.795, 0.81, 0.7]
    flags = []
    for i, v in enumerate(seq[:4]):
        flags.append(es.step(v, i))
    assert flags == [True, True, False, False] and es.should_stop and es.best_epoch == 1
    es2 = EarlyStopping(patience=2)
    es2.load_state_dict(es.state_dict())
    assert es2.should_stop and es2.best == pytest.approx(0.8)


@pytest.fixture
def frames(synth_dir, synth_split):
    return split_frames(read_table(synth_dir), read_split(synth_split))


def test_tiny_run_lowers_loss_and_writes_loadable_checkpoint(frames, tiny_cfg, tmp_path):
    tiny_cfg.train.epochs = 4
    tiny_cfg.train.lr = 3e-3
    res = fit("timm:resnet10t", *frames, tiny_cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(hist) == 4 and hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    model, meta = models.load_checkpoint(tmp_path / "run")
    assert meta["epoch"] == res["best_epoch"] and meta["input_size"] == 32 and meta["cam_layer"] == "layer4"
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and "config" in meta
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    with pytest.raises(Exception, match="--resume"):
        fit("timm:resnet10t", *frames, tiny_cfg, tmp_path / "run", progress=False)


def test_killed_run_resumes_to_the_same_best_checkpoint(frames, tiny_cfg, tmp_path):
    tiny_cfg.train.epochs = 4
    tiny_cfg.train.deterministic = True
    tiny_cfg.train.patience = 10
    tiny_cfg.data.rotation = 180  # augmentation randomness must be reproduced too
    full = fit("timm:resnet10t", *frames, tiny_cfg, tmp_path / "full", progress=False)
    part = fit("timm:resnet10t", *frames, tiny_cfg, tmp_path / "part", progress=False, stop_after_epochs=2)
    assert part == {"arch": "timm:resnet10t", "interrupted_after_epoch": 1}
    assert len(pd.read_csv(tmp_path / "part" / "history.csv")) == 2
    resumed = fit("timm:resnet10t", *frames, tiny_cfg, tmp_path / "part", progress=False, resume=True)
    assert resumed["best_epoch"] == full["best_epoch"]
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = pd.read_csv(tmp_path / "full" / "history.csv")
    hb = pd.read_csv(tmp_path / "part" / "history.csv")
    assert np.allclose(ha["val_loss"], hb["val_loss"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, _ = models.create_model("timm:resnet10t", pretrained="none")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(rank)  # each rank sees different data
    ds = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 7, (8,), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    loss = train_one_epoch(ddp, torch.nn.CrossEntropyLoss(), opt, loader, torch.device("cpu"),
                                 channels_last=False, max_steps=1, progress=False)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    if rank == 0:
        torch.save({"same": all(torch.equal(gathered[0], t) for t in gathered), "changed": changed, "loss": loss}, out)
    dist.destroy_process_group()


def test_two_process_gloo_training_step_keeps_replicas_in_sync(tmp_path):
    out = str(tmp_path / "ddp.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    res = torch.load(out, weights_only=True)
    assert res["same"] and res["changed"] and np.isfinite(res["loss"])
