"""The clinician page in headless Chromium: upload an image, see probabilities and the heatmap."""

import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app):
    """Any ASGI app on a free loopback port, in a thread; yields its URL, then stops it."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(timeout=10)


def _serve(bundle, **settings):
    """The clinician service over `bundle` (see `serve_in_thread`)."""
    from lesionlab.serve.app import create_app

    yield from serve_in_thread(create_app(bundle, device="cpu", **settings))


@pytest.fixture(scope="module")
def server(tiny_bundle):
    yield from _serve(tiny_bundle)


def _launch(playwright, chromium: str):
    """Headless Debian Chromium with nothing reaching the network."""
    return playwright.chromium.launch(executable_path=chromium, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def require_chromium(chromium: str | None, ci: str | None) -> str:
    """The Chromium to drive; without one the test skips, except under CI=true, where it fails."""
    if chromium is None:
        msg = "Debian's chromium is not installed (`make browser-deps` or apt-get install chromium)"
        if (ci or "").lower() == "true":
            pytest.fail(f"CI=true: {msg}; the clinician page must be tested in CI", pytrace=False)
        pytest.skip(msg)
    return chromium


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium(CHROMIUM, os.environ.get("CI"))


@pytest.mark.parametrize("ci", ["true", "TRUE"])
def test_missing_chromium_fails_under_ci(ci):
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_chromium(None, ci)


def test_missing_chromium_skips_outside_ci():
    with pytest.raises(pytest.skip.Exception):
        require_chromium(None, None)


def test_upload_shows_probabilities_and_heatmap(chromium, server, tmp_path):
    from playwright.sync_api import sync_playwright

    img = tmp_path / "lesion.jpg"
    Image.fromarray(np.random.default_rng(0).integers(60, 200, (150, 200, 3), dtype=np.uint8)).save(img)
    with sync_playwright() as p:
        browser = _launch(p, chromium)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(server + "/")
            assert "Decision support, not a diagnosis" in page.inner_text("#disclaimer")
            page.wait_for_function("document.getElementById('bundle').textContent.includes('2 models')")
            page.set_input_files("#file", str(img))
            page.wait_for_selector("#bars .bar", timeout=60_000)
            bars = page.query_selector_all("#bars .bar")
            assert len(bars) == 7
            pcts = [float(b.inner_text().split()[-1].rstrip("%")) for b in bars]
            assert abs(sum(pcts) - 100) < 1 and pcts == sorted(pcts, reverse=True)
            assert page.inner_text("#mel-flag") in ("ABOVE the threshold", "below the threshold")
            assert len(page.query_selector_all("#members tbody tr")) == 2
            page.wait_for_function("(document.getElementById('heatmap').getAttribute('src') || '').startsWith('data:image/png')")
            assert "on" not in (page.get_attribute("#heatmap", "class") or "")
            page.check("#toggle-heatmap")
            assert "on" in page.get_attribute("#heatmap", "class")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            # a bad file shows an error message, and the page keeps working
            bad = tmp_path / "notes.jpg"
            bad.write_bytes(b"not an image at all")
            page.set_input_files("#file", str(bad))
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "not a readable image" in page.inner_text("#error")
        finally:
            browser.close()


@pytest.fixture(scope="module")
def trust_server(trust_bundle):
    """The service over a bundle with calibration, the conformal differential and the refusals."""
    yield from _serve(trust_bundle)


def test_calibrated_result_differential_and_refusal_card(chromium, trust_server, trust_study, tmp_path):
    """Each state of the page: an evaluable image (calibrated probabilities, the differential at its coverage,
    the melanoma flag against its threshold), an unevaluable one (the refusal card: why and what to do)."""
    import httpx
    import pandas as pd
    from playwright.sync_api import sync_playwright

    sp = pd.read_csv(trust_study / "splits.csv", dtype=str)
    paths = {p.stem: p for p in (trust_study.parent / "data").rglob("*.jpg")}
    good, body = None, None
    for i in sp.loc[sp["split"] == "val", "image_id"]:
        body = httpx.post(trust_server + "/api/predict", files={"image": ("x.jpg", paths[i].read_bytes())},
                          timeout=60).json()
        if body["status"] == "ok":
            good = paths[i]
            break
    assert good is not None
    thumb = tmp_path / "thumb.jpg"
    Image.open(good).resize((16, 12)).save(thumb)
    with sync_playwright() as p:
        browser = _launch(p, chromium)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(trust_server + "/")
            page.set_input_files("#file", str(good))
            page.wait_for_selector("#bars .bar", timeout=60_000)
            assert len(page.query_selector_all("#bars .bar")) == 7
            assert "calibrated" in page.inner_text("#calibration-note") and "NOT" not in page.inner_text("#calibration-note")
            assert page.inner_text("#diff-coverage") == "(90% coverage)"
            chips = [c.get_attribute("data-cls") for c in page.query_selector_all("#differential .chip")]
            assert chips == body["differential"]
            assert page.inner_text("#mel-flag") in ("ABOVE the threshold", "below the threshold")
            assert page.inner_text("#mel-thr") == f"{100 * body['melanoma_threshold']:.1f}%"
            assert not page.is_visible("#refusal")
            page.screenshot(path=str(tmp_path / "ok.png"), full_page=True)
            # an unevaluable image: the refusal card says why and what to do, and no diagnosis is shown
            page.set_input_files("#file", str(thumb))
            page.wait_for_selector("#refusal", state="visible", timeout=60_000)
            assert "too small" in page.inner_text("#refusal-reasons")
            assert "full resolution" in page.inner_text("#refusal-advice")
            assert "retake" in page.inner_text("#refusal").lower() and not page.is_visible("#out")
            assert not page.is_visible("#toggle-wrap")  # no heatmap of an image that gets no diagnosis
            page.screenshot(path=str(tmp_path / "refused.png"), full_page=True)
            # and back to an evaluable image
            page.set_input_files("#file", str(good))
            page.wait_for_selector("#out", state="visible", timeout=60_000)
            assert not page.is_visible("#refusal")
        finally:
            browser.close()


@pytest.fixture(scope="module")
def token_server(tiny_bundle, tmp_path_factory):
    from lesionlab.serve.tokens import TokenStore

    f = tmp_path_factory.mktemp("tok") / "tokens.json"
    store, token = TokenStore.load(f, create=True).add("exam-room-1")
    store.save()
    for url in _serve(tiny_bundle, tokens=f, allowed_hosts=("127.0.0.1",)):
        yield url, token


def test_page_asks_for_the_token_once_per_session(chromium, token_server, tmp_path):
    """With tokens required, the page asks for one, rejects a wrong one, and then works for the whole browser
    session without asking again (the token is kept in sessionStorage only)."""
    from playwright.sync_api import sync_playwright

    url, token = token_server
    img = tmp_path / "lesion.jpg"
    Image.fromarray(np.random.default_rng(0).integers(60, 200, (150, 200, 3), dtype=np.uint8)).save(img)
    with sync_playwright() as p:
        browser = _launch(p, chromium)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#token-form", state="visible", timeout=30_000)
            assert "waiting for your API token" in page.inner_text("#bundle")
            page.fill("#token", "llab_not-the-token")
            page.click("#token-form button")
            page.wait_for_function("document.getElementById('token-error').textContent.length > 0")
            page.fill("#token", token)
            page.click("#token-form button")
            page.wait_for_function("document.getElementById('bundle').textContent.includes('2 models')")
            assert not page.is_visible("#token-form")
            page.set_input_files("#file", str(img))
            page.wait_for_selector("#bars .bar", timeout=60_000)
            assert len(page.query_selector_all("#bars .bar")) == 7
            # same session, new page load: not asked again; the token never appears in the page or URL
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('bundle').textContent.includes('2 models')")
            assert not page.is_visible("#token-form") and token not in page.url and token not in page.content()
        finally:
            browser.close()
