"""Explanation sanity checks: shapes, localisation on a model trained here, weight randomisation, no leaks."""

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUasModule

from lesionlab import models
from lesionlab.cli import main
from lesionlab.explain.gradcam import METHODS, explain_image
from lesionlab.inference.predictor import Predictor

SIZE = 128


def _image(rng, with_blob: bool) -> np.ndarray:
    """Noise background; class evidence (a bright red blob) only ever inside the top-left quadrant."""
    img = rng.integers(90, 140, (SIZE, SIZE, 3)).astype(np.uint8)
    if with_blob:
        cy, cx = rng.integers(14, SIZE // 2 - 14, 2)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < 12**2
        img[m] = (230, 40, 40)
    return img


def _save_model(model, path, spec):
    models.save_checkpoint(model, {"arch": "timm:resnet10t", "timm_id": spec.timm_id, "input_size": SIZE,
                                   "mean": [0.5] * 3, "std": [0.25] * 3, "crop_fraction": 1.0, "cam_layer": "layer4"}, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """resnet10t trained here to tell MEL (blob in the top-left quadrant) from NV (no blob)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, spec = models.create_model("timm:resnet10t", pretrained="none")
    x = np.stack([_image(rng, i % 2 == 0) for i in range(160)])
    y = torch.tensor([0 if i % 2 == 0 else 1 for i in range(160)])
    xt = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(6):
        for i in range(0, 160, 16):
            loss = torch.nn.functional.cross_entropy(model(xt[i : i + 16]), y[i : i + 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
    d = tmp_path_factory.mktemp("explain")
    _save_model(model, d / "model", spec)
    model.eval()
    acc = (model(xt).argmax(1) == y).float().mean().item()
    return d, acc, spec


def test_model_learned_the_task(trained):
    assert trained[1] > 0.9


def test_heatmap_peaks_inside_the_evidence_region(trained):
    d, _, _ = trained
    pr = Predictor(d / "model", device="cpu", precision="fp32")
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(10):
        img = Image.fromarray(_image(rng, True))
        ex = explain_image([pr], img, method="gradcam", cls="MEL")
        m = ex.members[pr.name]
        assert m.shape == ex.display.shape[:2] == (SIZE, SIZE) and m.min() >= 0 and m.max() <= 1
        py, px = np.unravel_index(np.argmax(m), m.shape)
        hits += py < SIZE // 2 and px < SIZE // 2
    assert hits >= 9


def test_randomised_weights_change_the_maps(trained, tmp_path):
    """Model-randomisation test (Adebayo et al., 2018): maps of a randomised model must differ clearly."""
    d, _, spec = trained
    pr = Predictor(d / "model", device="cpu", precision="fp32")
    torch.manual_seed(1)
    rnd, _ = models.create_model("timm:resnet10t", pretrained="none")
    _save_model(rnd, tmp_path / "random", spec)
    pr_rnd = Predictor(tmp_path / "random", device="cpu", precision="fp32")
    rng = np.random.default_rng(9)
    corrs = []
    for _ in range(5):
        img = Image.fromarray(_image(rng, True))
        a = explain_image([pr], img, cls="MEL").members[pr.name]
        b = explain_image([pr_rnd], img, cls="MEL").members[pr_rnd.name]
        corrs.append(np.corrcoef(a.ravel(), b.ravel())[0, 1] if b.std() > 0 else 0.0)
    assert np.mean(corrs) < 0.5


def test_all_methods_and_the_ensemble_mean(trained):
    d, _, _ = trained
    a = Predictor(d / "model", device="cpu", precision="fp32")
    b = Predictor(d / "model", device="cpu", precision="fp32")
    b.name = "copy"
    img = Image.fromarray(_image(np.random.default_rng(2), True))
    for method in METHODS:
        ex = explain_image([a, b], img, method=method)
        assert set(ex.members) == {a.name, "copy"}
        assert np.allclose(ex.ensemble, (ex.members[a.name] + ex.members["copy"]) / 2)
        assert 0 <= ex.ensemble.min() and ex.ensemble.max() <= 1
    # guided backprop swapped the ReLUs and must have put plain ones back
    relus = [m for m in a.model.modules() if isinstance(m, torch.nn.ReLU)]
    assert relus and not any(isinstance(m, GuidedBackpropReLUasModule) for m in a.model.modules())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_two_hundred_explanations_do_not_grow_memory(trained):
    d, _, _ = trained
    pr = Predictor(d / "model", device="cpu", precision="fp32")
    layer = pr.model.get_submodule("layer4")
    img = Image.fromarray(_image(np.random.default_rng(3), True))
    for _ in range(20):
        explain_image([pr], img)
    before = _rss_mb()
    for i in range(200):
        explain_image([pr], img, method="guided-gradcam" if i % 10 == 0 else "gradcam")
    grown = _rss_mb() - before
    assert grown < 40, f"memory grew by {grown:.1f} MB over 200 explanations"
    assert not layer._forward_hooks and all(p.grad is None for p in pr.model.parameters())


def test_explain_cli_writes_overlays_and_raw_maps_and_skips_bad_images(trained, tmp_path, capsys):
    d, _, _ = trained
    rng = np.random.default_rng(4)
    Image.fromarray(_image(rng, True)).resize((150, 100)).save(tmp_path / "a.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    out = tmp_path / "out"
    code = main(["explain", str(tmp_path / "a.jpg"), str(tmp_path / "bad.jpg"), "--run", str(d / "model"), "--run",
                 str(d / "model"), "--out", str(out), "--save-raw", "--class", "MEL", "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "bad.jpg" in err and "not a readable image" in err
    raw = sorted(out.glob("a_gradcam_MEL_*.npy"))
    assert len(raw) == 3  # ensemble + the two members
    arr = np.load(raw[0])
    assert arr.shape == (100, 150) and arr.min() >= 0 and arr.max() <= 1
    assert len(list(out.glob("a_gradcam_MEL_*.png"))) == 3


def test_a_prediction_during_an_explanation_does_not_reach_its_map(trained):
    """Grad-CAM hooks must not sit on the module that predictions share (the service runs both concurrently).

    Deterministic version of the race: while the explanation's forward pass is under way (a pre-hook on the
    first stage), another thread predicts a different image on the same Predictor and finishes.
    """
    import threading

    d, _, _ = trained
    pr = Predictor(d / "model", device="cpu", precision="fp32")
    rng = np.random.default_rng(11)
    img, other = (Image.fromarray(_image(rng, True)) for _ in range(2))
    alone = explain_image([Predictor(d / "model", device="cpu", precision="fp32")], img, cls="MEL").members[pr.name]
    state = {"armed": True}

    def predict_meanwhile(module, inputs):
        if state["armed"] and torch.is_grad_enabled():  # the explanation's pass, not the prediction's
            state["armed"] = False
            t = threading.Thread(target=pr.predict_images, args=([other],))
            t.start()
            t.join()

    # registered before this Predictor's first explanation, so any module copied from it carries the hook too
    pr.model.get_submodule("layer1").register_forward_pre_hook(predict_meanwhile)
    raced = explain_image([pr], img, cls="MEL").members[pr.name]
    assert not state["armed"]  # the concurrent prediction did run
    np.testing.assert_array_equal(raced, alone)


def test_explanations_run_on_weight_sharing_copies(trained):
    from lesionlab.explain.gradcam import explain_model

    d, _, _ = trained
    pr = Predictor(d / "model", device="cpu", precision="fp32")
    with explain_model(pr) as a, explain_model(pr) as b:  # two explanations in flight: two copies
        assert a is not b and a is not pr.model
        for m in (a, b):
            for p, q in zip(m.parameters(), pr.model.parameters(), strict=True):
                assert p.data_ptr() == q.data_ptr() and not p.requires_grad  # no extra weight memory
    with explain_model(pr) as c:
        assert c is a or c is b  # copies are reused
