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


def _weights(run) -> dict[str, torch.Tensor]:
    """The final weights (last.pt: the best epoch in model.safetensors may be an early one) and the best ones."""
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]
    return {**{f"last.{k}": v for k, v in last.items()}, **{f"best.{k}": v for k, v in load_file(str(run / "model.safetensors")).items()}}


def test_resume_is_exact_with_worker_processes(frames, tiny_cfg, tmp_path):
    """num_workers=2 (persistent workers): stopped after epoch 1 and resumed == uninterrupted == num_workers=0."""
    tiny_cfg.train.epochs = 2
    tiny_cfg.train.deterministic = True
    tiny_cfg.train.patience = 10
    tiny_cfg.train.max_steps_per_epoch = 2
    tiny_cfg.data.batch_size = 8
    tiny_cfg.data.rotation = 180  # augmentation randomness must be reproduced in the workers too
    tiny_cfg.data.num_workers = 2
    kw = dict(cache_dir=tmp_path / "cache", progress=False)
    fit("timm:resnet10t", *frames, tiny_cfg, tmp_path / "full", **kw)
    assert fit("timm:resnet10t", *frames, tiny_cfg, tmp_path / "part", stop_after_epochs=1, **kw)["interrupted_after_epoch"] == 0
    fit("timm:resnet10t", *frames, tiny_cfg, tmp_path / "part", resume=True, **kw)
    tiny_cfg.data.num_workers = 0
    fit("timm:resnet10t", *frames, tiny_cfg, tmp_path / "w0", **kw)
    a, b, c = _weights(tmp_path / "full"), _weights(tmp_path / "part"), _weights(tmp_path / "w0")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert all(torch.equal(a[k], c[k]) for k in a), "num_workers changed the result"
    last = torch.load(tmp_path / "part" / "last.pt", map_location="cpu", weights_only=True)
    assert last["config"]["train.lr"] == tiny_cfg.train.lr and last["arch"] == "timm:resnet10t" and "split_sha256" in last


def test_resume_refuses_another_config_or_split_in_one_line(synth_dir, synth_split, tmp_path, capsys):
    from lesionlab.cli import main

    base = ["train", "--data", str(synth_dir), "--split", str(synth_split), "--config", "demo", "--arch", "timm:resnet10t",
            "--epochs", "1", "--out", str(tmp_path / "run"), "--set", "data.image_size=32", "--set", "train.max_steps_per_epoch=1",
            "--set", "train.precision=fp32"]
    assert main(base) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    capsys.readouterr()
    assert main([*base, "--resume", "--set", "train.lr=0.0001"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "train.lr 0.0001 != 0.001 in " in err and "last.pt" in err and "without --resume" in err
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # the run's config is not overwritten
    other = tmp_path / "other_split.csv"
    head, *rows = synth_split.read_text().splitlines()
    other.write_text("\n".join([head, *reversed(rows)]) + "\n")  # same images, another file
    assert main([*[str(other) if x == str(synth_split) else x for x in base], "--resume"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "split file sha256" in err and "last.pt" in err
    # settings that cannot change the result (workers, cache, more epochs) may differ
    assert main([*base, "--resume", "--epochs", "2", "--set", "data.num_workers=1"]) == 0
    assert len(pd.read_csv(tmp_path / "run" / "timm_resnet10t" / "history.csv")) == 2
    # ... but not fewer epochs than were run (before: accepted, leaving the 2-epoch model under a 1-epoch config);
    # the study's train step starts such a folder over by the same rule (training.provenance)
    capsys.readouterr()
    assert main([*base, "--resume", "--epochs", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.epochs 1 < 2 epochs already run in " in err and "without --resume" in err


def test_what_training_reads_is_one_rule(tiny_cfg):
    """The study's train step and `train --resume` compare records through these two functions (issue 16.8)."""
    from lesionlab.training.provenance import differences, training_reads

    now = training_reads("timm:resnet10t", tiny_cfg)  # train.epochs == 2
    assert now["arch"] == "timm:resnet10t" and now["train.lr"] == tiny_cfg.train.lr
    # workers, cache, the other architectures and (fusion off) the fusion keys cannot change the model
    assert not {"data.num_workers", "data.cache", "data.cache_dir", "train.archs", "train.metadata"} & set(now)
    recorded = {**now, "train.epochs": 1, "train.lr": 0.5}
    assert differences(recorded, now, epochs_run=1) == {"train.lr": f"train.lr {tiny_cfg.train.lr!r} != 0.5"}
    recorded["train.lr"] = tiny_cfg.train.lr
    assert differences(recorded, now, epochs_run=1) == {}  # 1 epoch run, 2 asked: the run continues
    assert differences(recorded, now, epochs_run=3) == {"train.epochs": "train.epochs 2 < 3 epochs already run"}
    assert differences(recorded, now) == {"train.epochs": "train.epochs 2 != 1"}  # no last.pt to continue from


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
