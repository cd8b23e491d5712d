"""The reports as a person sees them: the campaign and round report artifacts opened in the Prefect UI.

    bash scripts/setup_browser.sh                       # Debian's chromium and chromium-driver, once
    .venv/bin/python -m pytest tests/ui

A real `prefect server` (SQLite in a temporary PREFECT_HOME), one round of configs/tiny.yaml run by
`sao campaign` against it, then each report's artifact page opened in headless Chromium, in the UI the
server shows by default (V2, under /v2) and in the V1 UI it can switch to: the markdown must render as
HTML, its table with the report's cells and its plot an <img> that the browser decoded. The plot is the
PNG inlined as a data URL (sao_core.campaign.campaign_report.data_url): a `file://` link, as the report once had,
is an image no browser page served over HTTP may load.

Without /usr/bin/chromium and /usr/bin/chromedriver (SAO_CHROMIUM, SAO_CHROMEDRIVER elsewhere) the tests
skip, or fail when SAO_REQUIRE_BROWSER=1 (`make test`). A failed page leaves its screenshot in pytest's temporary folder, named in the message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sao_core.campaign.campaign_report import campaign_rows, data_url
from sao_core.store import storage
from tests.cluster.harness import api_call, free_port
from tests.procs import start, stop, wait_healthy

pytestmark = pytest.mark.tier1

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM = Path(os.environ.get("SAO_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("SAO_CHROMEDRIVER", "/usr/bin/chromedriver"))
CAMPAIGN = "tiny"  # configs/tiny.yaml's run.campaign
# The two UIs Prefect 3.9.1 serves: V2 is the default (the server redirects "/" there), V1 one click away.
UI_ROUTES = {"v2": "/v2/artifacts/artifact/{id}", "v1": "/artifacts/artifact/{id}"}
RENDER_TIMEOUT_S = 60

# What the page shows once the markdown is rendered: every table as rows of cell texts, and each image
# by its alt text with what the browser made of it (complete and naturalWidth > 0: decoded, not broken).
RENDERED = """
const tables = [...document.querySelectorAll('table')].map(
    t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim())));
const images = [...document.querySelectorAll('img')].filter(i => i.alt === arguments[0]).map(
    i => ({src: i.getAttribute('src') || '', complete: i.complete, width: i.naturalWidth}));
return {tables: tables, images: images};
"""


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT, the UI's root
    api: str  # {url}/api


@dataclass
class Reports:
    """The two report artifacts (as the API returns them) of the one round run, and where it wrote."""

    campaign: dict[str, Any]
    round: dict[str, Any]
    root: Path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through Selenium, from Debian's packages; skipped when they are missing, failed
    if SAO_REQUIRE_BROWSER=1."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (a dev dependency: pip install -e '.[dev]')")
    if missing:
        message = f"no browser for the UI tests: missing {', '.join(missing)} (bash scripts/setup_browser.sh installs chromium and chromium-driver)"
        if os.environ.get("SAO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SAO_REQUIRE_BROWSER=1: {message}")
        pytest.skip(message)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as mp:
        # The browser and driver are given by path; Selenium Manager must not try to download either.
        mp.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`prefect server start` on a free port, its UI told where the API is (PREFECT_UI_API_URL)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    server = Server(url=f"http://127.0.0.1:{port}", api=f"http://127.0.0.1:{port}/api")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=server.api
    )
    log = home / "server.log"
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start(argv, env, log, new_session=False)
    try:
        wait_healthy(f"{server.api}/health", proc, log, what="prefect server")
        yield server
    finally:
        stop(proc)


def _latest_artifact(api: str, key: str) -> dict[str, Any]:
    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    found = api_call("POST", f"{api}/artifacts/filter", body)
    assert found, f"no artifact with key {key!r} on the server"
    return found[0]


@pytest.fixture(scope="module")
def reports(prefect_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Reports:
    """One round of configs/tiny.yaml by `sao campaign`, against the server; its two report artifacts."""
    root = tmp_path_factory.mktemp("campaign")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_API_URL=prefect_server.api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    argv = [str(BIN / "sao"), "campaign", "--config", str(REPO / "configs" / "tiny.yaml"), "--rounds", "1"]
    argv += ["--set", f"run.root={root}", "--set", "evaluation.n=6"]
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"sao campaign failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return Reports(
        campaign=_latest_artifact(prefect_server.api, f"{CAMPAIGN}-campaign-report"),
        round=_latest_artifact(prefect_server.api, f"{CAMPAIGN}-round-report"),
        root=root,
    )


@contextmanager
def _screenshot_on_failure(driver: Any, screenshot: Path) -> Iterator[None]:
    """A failing check leaves the page as the browser showed it in `screenshot`, named in the error."""
    try:
        yield
    except Exception as e:
        driver.save_screenshot(str(screenshot))
        e.add_note(f"screenshot of {driver.current_url}: {screenshot}")
        raise


def _render(driver: Any, url: str, header: list[str], alt: str) -> dict[str, Any]:
    """Open `url` and wait until it shows a table headed `header` and a decoded image `alt`; return
    what the page shows (RENDERED)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d: Any) -> dict[str, Any] | None:
        page = d.execute_script(RENDERED, alt)
        has_table = any(t and t[0] == header for t in page["tables"])
        has_image = any(i["complete"] and i["width"] > 0 for i in page["images"])
        return page if has_table and has_image else None

    driver.get(url)
    try:
        return WebDriverWait(driver, RENDER_TIMEOUT_S, poll_frequency=0.5).until(shown)
    except TimeoutException:
        page = driver.execute_script(RENDERED, alt)
        images = [{**i, "src": i["src"][:40]} for i in page["images"]]
        headers = [t[0] if t else [] for t in page["tables"]]
        raise AssertionError(
            f"{url} did not render within {RENDER_TIMEOUT_S} s: want a table headed {header} and a "
            f"decoded image {alt!r}; the page has tables headed {headers} and images {images}"
        ) from None


def _table(page: dict[str, Any], header: list[str]) -> list[dict[str, str]]:
    [table] = [t for t in page["tables"] if t and t[0] == header]
    return [dict(zip(header, row, strict=True)) for row in table[1:]]


def _image(page: dict[str, Any]) -> dict[str, Any]:
    [image] = [i for i in page["images"] if i["complete"] and i["width"] > 0]
    return image


def _png_width(png: bytes) -> int:
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG"
    return int.from_bytes(png[16:20], "big")  # IHDR: the first chunk, width first


@pytest.mark.parametrize("ui", sorted(UI_ROUTES))
def test_campaign_report_shows_its_table_and_plot_in_the_ui(
    ui: str, browser: Any, prefect_server: Server, reports: Reports, tmp_path: Path
) -> None:
    header = ["round", "started from", "pairs", "judge valid / agreement"]
    header += ["vs previous", "vs original", "downstream", "outcome"]
    [expected] = campaign_rows(str(reports.root), CAMPAIGN)
    png = storage.read_bytes(str(reports.root / CAMPAIGN / "campaign_report.png"))
    url = prefect_server.url + UI_ROUTES[ui].format(id=reports.campaign["id"])
    with _screenshot_on_failure(browser, tmp_path / f"campaign-report-{ui}.png"):
        page = _render(browser, url, header, "campaign plot")
        [row] = _table(page, header)
        assert row["round"] == "1"
        assert row["outcome"] == f"{expected['status']}: {expected['why']}"
        # The image is the campaign's plot (the PNG next to campaign_report.md), decoded at its size.
        image = _image(page)
        assert image["src"] == data_url(png)
        assert image["width"] == _png_width(png)


@pytest.mark.parametrize("ui", sorted(UI_ROUTES))
def test_round_report_shows_stages_and_training_curves_in_the_ui(
    ui: str, browser: Any, prefect_server: Server, reports: Reports, tmp_path: Path
) -> None:
    header = ["stage", "rows in", "rows out", "drops", "seconds", "tokens/s"]
    [curves] = list(reports.root.rglob("train_curves.png"))
    png = curves.read_bytes()
    url = prefect_server.url + UI_ROUTES[ui].format(id=reports.round["id"])
    with _screenshot_on_failure(browser, tmp_path / f"round-report-{ui}.png"):
        page = _render(browser, url, header, "training curves")
        stages = _table(page, header)
        assert [s["stage"] for s in stages][:2] == ["personas", "prompts"], stages
        # The clock says little under a second (a stage of the scripted engine takes ~0 s): no rate
        # there, where tokens / ~0 s once read 553,000 tokens/s.
        quick = [s for s in stages if float(s["seconds"]) < 1.0]
        assert quick, f"every stage took a second or more; the check below would test nothing: {stages}"
        rated = [(s["stage"], s["seconds"], s["tokens/s"]) for s in quick if s["tokens/s"] != "-"]
        assert not rated, f"a rate for stages under a second (stage, seconds, tokens/s): {rated}"
        for s in stages:
            assert s["tokens/s"] == "-" or re.fullmatch(r"\d+\.\d", s["tokens/s"]), s
        image = _image(page)
        assert image["src"] == data_url(png)
        assert image["width"] == _png_width(png)
