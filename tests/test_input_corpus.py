"""Input safety: every file of the bad-input corpus (tests/corpus.py) decodes correctly or is an ImageError of the
right kind, never another exception; Pillow is only ever offered the one format the leading bytes announce; and
`lesionlab predict` over the whole corpus reports each bad file on its own line and still predicts the good ones."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from corpus import corpus, display_p3_profile, lab_to_srgb, p3_to_srgb, write_corpus
from PIL import EpsImagePlugin, Image

from lesionlab.data.images import SUPPORTED_FORMATS, ImageError, decode_input, sniff_format


@pytest.mark.parametrize("item", corpus(), ids=lambda it: it.name)
def test_corpus_item_decodes_or_is_refused_with_one_line(item):
    if item.expect == "ok":
        d = decode_input(io.BytesIO(item.data), name=item.name)
        assert d.image.mode == "RGB" and min(d.image.size) > 0
        if item.pixel is not None:
            w, h = d.image.size
            got = np.asarray(d.image)[h // 2, w // 2].astype(int)
            assert np.abs(got - np.array(item.pixel)).max() <= item.tol, (item.name, got, item.pixel)
    else:
        with pytest.raises(ImageError) as e:
            decode_input(io.BytesIO(item.data), name=item.name)
        msg = str(e.value)
        assert msg.startswith(item.name) and "\n" not in msg and "Traceback" not in msg
        if item.kind is not None:
            assert e.value.kind == item.kind, msg


def test_pillow_is_offered_only_the_sniffed_format_and_ghostscript_never_runs(monkeypatch):
    offered: list[tuple[str, list[str] | None]] = []
    real_open = Image.open

    def spy(fp, mode="r", formats=None):
        offered.append((fmt, formats))
        return real_open(fp, mode, formats)

    def no_ghostscript(*a, **k):
        raise AssertionError("Ghostscript was asked to render an upload")

    monkeypatch.setattr(Image, "open", spy)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    for item in corpus():
        fmt = item.name
        with contextlib.suppress(ImageError):
            decode_input(io.BytesIO(item.data), name=item.name)
    assert offered, "the spy saw no Pillow call"
    for name, formats in offered:
        if name.endswith(".dcm"):  # pydicom's Pillow decoder restricts itself to the JPEG family
            assert formats is not None and set(formats) <= {"JPEG", "JPEG2000"}, (name, formats)
        else:
            assert formats is not None and len(formats) == 1 and formats[0] in SUPPORTED_FORMATS, (name, formats)
    # files that are not one of the accepted formats never reach Pillow at all
    refused_early = {it.name for it in corpus() if sniff_format(it.data[:132]) is None}
    assert {"drawing.eps", "page.ps", "doc.pdf", "image.svg", "anim.gif", "html-then-jpeg.jpg"} <= refused_early
    assert not refused_early & {n for n, _ in offered}


def test_display_p3_pixels_are_converted_to_srgb_as_the_matrices_say():
    """The ICC conversion (littleCMS) against an independent numpy conversion over a grid of colours."""
    rng = np.random.default_rng(0)
    src = rng.integers(40, 216, (8, 8, 3)).astype(np.uint8)  # mostly inside sRGB's gamut
    buf = io.BytesIO()
    Image.fromarray(src).save(buf, "PNG", icc_profile=display_p3_profile())
    got = np.asarray(decode_input(io.BytesIO(buf.getvalue()), name="p3.png").image).astype(float)
    want = np.stack([p3_to_srgb(tuple(px)) for px in src.reshape(-1, 3)]).reshape(src.shape)
    inside = (want > 1).all(-1) & (want < 254).all(-1)
    assert inside.sum() > 40
    assert np.abs(got - want)[inside].max() <= 2.0
    assert np.abs(src.astype(float) - want)[inside].max() > 8  # read as sRGB it would have been visibly wrong


def test_lab_tiff_is_converted_like_the_textbook_formulas():
    vals = [(50, 0, 0), (70, 25, 10), (40, -20, 30)]
    im = Image.new("LAB", (len(vals), 1))
    im.putdata([(round(L * 2.55), a + 128, b + 128) for L, a, b in vals])
    buf = io.BytesIO()
    im.save(buf, "TIFF")
    got = np.asarray(decode_input(io.BytesIO(buf.getvalue()), name="lab.tif").image)[0].astype(float)
    want = np.stack([lab_to_srgb((round(L * 2.55) / 2.55, a, b)) for L, a, b in vals])
    assert np.abs(got - want).max() <= 3


def test_predict_over_the_corpus_reports_each_bad_file_and_predicts_the_good_ones(tiny_bundle, tmp_path, capsys):
    from lesionlab.cli import main

    items = write_corpus(tmp_path / "corpus")
    paths = [str(tmp_path / "corpus" / n) for n in items]
    code = main(["predict", *paths, "--bundle", str(tiny_bundle), "--device", "cpu", "--engine", "torch",
                 "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 1  # at least one input failed
    assert "Traceback" not in err
    rows = {r["image"].rsplit("/", 1)[-1]: r for r in json.loads(out)}
    assert set(rows) == set(items)
    for name, it in items.items():
        if it.expect == "ok":
            assert rows[name].get("status") in ("ok", "unevaluable"), (name, rows[name])
        else:
            assert "error" in rows[name], (name, rows[name])
            assert sum(name in line and "skipped" in line for line in err.splitlines()) == 1, name
    n_bad = sum(it.expect == "refused" for it in items.values())
    assert f"{n_bad} of {len(items)} input(s) failed" in err
