"""The reading page in headless Chromium: a reader completes 3 cases x 2 phases with the keyboard and the mouse,
stops mid-way, resumes in a fresh browser (the crash case), and the database holds exactly their answers."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from test_browser import CHROMIUM, _launch, require_chromium, serve_in_thread

pytestmark = pytest.mark.browser
LABELS = ["MEL", "NV", "BKL"]


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium(CHROMIUM, os.environ.get("CI"))


@pytest.fixture(scope="module")
def study(tiny_bundle, tmp_path_factory):
    from helpers import lesion_like

    from lesionlab.clinic.bundle import EnsemblePredictor
    from lesionlab.workflows.reader_study.create import create_study
    from lesionlab.workflows.reader_study.db import open_db

    d = tmp_path_factory.mktemp("rs_browser")
    rows = []
    for k, label in enumerate(LABELS):
        p = d / f"img{k}.jpg"
        lesion_like(200, 150, seed=10 + k).save(p)
        rows.append({"image_id": p.stem, "label": label, "path": str(p)})
    db = open_db(d / "study.sqlite")
    made = create_study(db, name="browser", cases=pd.DataFrame(rows), bundle=EnsemblePredictor(tiny_bundle, device="cpu"),
                        washout_days=0, readers=["ann"])
    return db, made


@pytest.fixture(scope="module")
def server(study):
    from lesionlab.serve.reader_app import create_reader_app

    yield from serve_in_thread(create_reader_app(study[0]))


def _case(page) -> str:
    page.wait_for_function("document.getElementById('case-key').textContent.length > 0 && "
                           "(document.getElementById('case-image').getAttribute('src') || '').startsWith('blob:')")
    return page.inner_text("#case-key")


def _answer_with_keys(page, dx_key: str, rating_key: str, mgmt_key: str) -> str:
    key = _case(page)
    before = page.inner_text("#progress")
    page.keyboard.press(dx_key)
    page.keyboard.press(rating_key)
    page.keyboard.press(mgmt_key)
    assert page.is_enabled("#submit")
    page.keyboard.press("Enter")
    _next(page, before)
    return key


def _next(page, progress_before: str) -> None:
    """Wait for the next case (the overall count in the progress line moves on) or the end page."""
    page.wait_for_function(f"document.getElementById('progress').textContent !== {progress_before!r} || "
                           "!document.getElementById('waiting').classList.contains('hidden')")


def test_reader_completes_stops_and_resumes(chromium, server, study, tmp_path):
    from playwright.sync_api import sync_playwright

    from lesionlab.workflows.reader_study.export import study_tables

    db, made = study
    link = f"{server}/#token={made.invitations['ann']}"
    given: dict[tuple[str, str], tuple[str, int, str]] = {}
    with sync_playwright() as p:
        browser = _launch(p, chromium)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto(server + "/")  # no token: told to open the link
            page.wait_for_selector("#needs-token", state="visible")
            page.goto(link)
            page.wait_for_selector("#profile", state="visible")
            assert "token" not in page.url  # the token left the address bar
            page.select_option("#level", "board-certified")
            page.fill("#years", "7")
            page.click("#save-profile")
            # phase 1: no AI anywhere on the page
            key = _case(page)
            assert "Phase 1 of 2 (unaided)" in page.inner_text("#progress") and "case 1 of 3" in page.inner_text("#progress")
            assert not page.is_visible("#ai")
            given[("unaided", _answer_with_keys(page, "1", "e", "z"))] = ("MEL", 3, "excise")
            assert key in [k for _, k in given]
            # the mouse works too
            key = _case(page)
            assert "case 2 of 3" in page.inner_text("#progress")
            page.check("input[name=dx][value=NV]")
            page.check("input[name=rating][value='1']")
            page.check("input[name=management][value=reassure]")
            before = page.inner_text("#progress")
            page.click("#submit")
            _next(page, before)
            given[("unaided", key)] = ("NV", 1, "reassure")
            # mid-case (the third case is open, half answered): stop, and the browser is gone
            open_key = _case(page)
            page.keyboard.press("5")
            page.click("#stop")
            assert "saved" in page.inner_text("#waiting")
            page.screenshot(path=str(tmp_path / "stopped.png"))
            page.close()
            # a fresh browser profile (crashed browser, another machine): the link resumes at the open case
            ctx = browser.new_context(viewport={"width": 1300, "height": 900})
            page = ctx.new_page()
            page.goto(link)
            assert _case(page) == open_key and "case 3 of 3" in page.inner_text("#progress")
            assert page.is_disabled("#submit")  # nothing carried over from the half answer
            given[("unaided", _answer_with_keys(page, "5", "y", "x"))] = ("BKL", 6, "follow-up")
            # phase 2: the AI's answer is shown as on the clinician page
            for k, (dx_key, dx) in enumerate([("2", "NV"), ("1", "MEL"), ("3", "BCC")]):
                _case(page)
                assert "Phase 2 of 2 (aided)" in page.inner_text("#progress")
                assert page.is_visible("#ai")
                if page.is_visible("#ai-out"):
                    bars = page.query_selector_all("#bars .bar")
                    assert len(bars) == 7
                    assert page.inner_text("#mel-flag") in ("ABOVE the threshold", "below the threshold")
                    if k == 0:
                        page.keyboard.press("h")
                        assert "on" in (page.get_attribute("#heatmap", "class") or "")
                        page.screenshot(path=str(tmp_path / "aided.png"), full_page=True)
                given[("aided", _answer_with_keys(page, dx_key, "w", "c"))] = (dx, 2, "reassure")
            page.wait_for_selector("#waiting", state="visible")
            assert "Finished" in page.inner_text("#waiting-title")
        finally:
            browser.close()
    reads, _ = study_tables(db, "browser", admin_token=made.admin_token)
    got = {(r.modality, r.case): (r.diagnosis, int(r.rating), r.management) for r in reads.itertuples()}
    assert got == given and len(reads) == 6
    assert (reads["reader_level"] == "board-certified").all() and (reads["reader_years"] == 7).all()
    assert list(reads.loc[reads["modality"] == "unaided", "phase"]) == [1, 1, 1]
