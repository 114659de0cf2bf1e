"""The MLflow UI in a real browser: `mlflow server` on a store written by a small search, driven by headless Chromium.

Needs Debian's chromium + chromium-driver (installed by .ci/run) and selenium (the test extra); skips with the reason
when either is missing. Screenshots go to the test's temp dir (runs.png, run.png, artifacts.png, report_html.png).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ..ports import free_port
from .small_search import small_search

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 180  # seconds for a page to render (React app; a loaded CI machine is slow)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1600,1300")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    if CHROMIUM is None or not os.access(CHROMEDRIVER, os.X_OK):
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium chromium-driver (see .ci/run)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # network events, for the offline check
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    return small_search(tmp_path_factory)


@pytest.fixture(scope="module")
def server(searched, tmp_path_factory):
    """`mlflow server` on a free localhost port, serving the search's SQLite store and its artifacts."""
    _, uri, _, work = searched
    port = free_port()
    log = open(tmp_path_factory.mktemp("mlflow-server") / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
         "--default-artifact-root", str(work / "mlruns" / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + WAIT
    while True:
        try:
            if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start (exit {proc.poll()}); see {log.name}")
        time.sleep(1)
    yield base
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this test started
    proc.wait(timeout=60)
    log.close()


def _wait(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.5).until(condition)
    except TimeoutException:
        shot = Path(driver.capabilities["chrome"]["userDataDir"]).parent / "timeout.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(f"the browser did not show {what} within {WAIT} s (screenshot: {shot})") from None


def _links_to(driver, run_ids) -> set[str]:
    from selenium.webdriver.common.by import By

    hrefs = {a.get_attribute("href") or "" for a in driver.find_elements(By.TAG_NAME, "a")}
    return {r for r in run_ids if any(h.endswith(f"/runs/{r}") for h in hrefs)}


def test_mlflow_ui_shows_nested_trial_runs_and_the_pareto_plot(searched, server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    result, uri, _, _ = searched
    c = MlflowClient(uri)
    parent = c.get_run(result.parent_run_id)
    exp = parent.info.experiment_id
    children = {r.info.run_id for r in c.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")}
    assert len(children) == 17

    # The experiment's run table: one parent row, the trials nested under it (expand the parent's [+]).
    browser.get(f"{server}/#/experiments/{exp}/runs")
    _wait(browser, lambda d: f"{1 + len(children)} matching runs" in d.find_element(By.TAG_NAME, "body").text,
          "the parent and its 13 trial runs in the run table")
    row = f"//a[contains(@href, '/runs/{result.parent_run_id}')]/ancestor::div[@role='gridcell']//button"
    _wait(browser, lambda d: d.find_elements(By.XPATH, row), "the parent run's row")[0].click()
    _wait(browser, lambda d: _links_to(d, children) == children, "every trial run under the expanded parent")
    rows = browser.find_elements(By.CSS_SELECTOR, "div[role='row'][row-id]")
    assert len({r.get_attribute("row-id") for r in rows}) >= 1 + len(children)
    browser.save_screenshot(str(tmp_path / "runs.png"))

    # The parent run's page lists its child runs (the first ten, then "Load more").
    browser.get(f"{server}/#/experiments/{exp}/runs/{result.parent_run_id}")
    _wait(browser, lambda d: "Child runs" in d.find_element(By.TAG_NAME, "body").text and
          len(_links_to(d, children)) >= 10, "the parent run's child runs")
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "embsize.kind" in body and result.recommended["trial_id"] in body  # tags: kind, recommended_trial
    browser.save_screenshot(str(tmp_path / "run.png"))

    # Its artifacts tab renders pareto.png from the artifact store (an <img> of the PNG's exact pixel size).
    png = (Path(c.download_artifacts(result.parent_run_id, "pareto.png", str(tmp_path)))).read_bytes()
    size = [int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")]  # the PNG header's width, height
    browser.get(f"{server}/#/experiments/{exp}/runs/{result.parent_run_id}/artifacts/pareto.png")
    _wait(browser, lambda d: any(d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i)
                                 == size for i in d.find_elements(By.TAG_NAME, "img")), "the pareto.png artifact")
    tree = browser.find_element(By.TAG_NAME, "body").text
    assert all(name in tree for name in ("pareto.png", "recommended.yaml", "front.csv", "summary.json"))
    browser.save_screenshot(str(tmp_path / "artifacts.png"))
    print(f"screenshots: {tmp_path}")


def test_report_html_renders_offline_in_chromium(searched, browser, tmp_path):
    """The interactive plot draws every point from the file alone: no request leaves file:// and data: URLs."""
    from selenium.webdriver.common.by import By

    from search.report import write_report
    from search.review import load_review, metric_histories

    result, uri, _, _ = searched
    reviewed = load_review(result.parent_run_id, uri)
    html = write_report(reviewed, tmp_path / "report", metric_histories(reviewed, reviewed.front))["pareto.html"]
    browser.get_log("performance")  # drop earlier events
    browser.get(Path(html).as_uri())
    finite = [r for r in reviewed.trials if r["best_val_auc"] == r["best_val_auc"]]
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".scatterlayer .point")) >= len(finite),
          "the plotly points")
    from selenium.webdriver.common.action_chains import ActionChains

    recommended = browser.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace")[-1]  # the last trace: the pick
    ActionChains(browser).move_to_element(recommended.find_element(By.CSS_SELECTOR, ".point")).perform()
    rec = reviewed.recommended
    hover = _wait(browser, lambda d: "".join(e.text for e in d.find_elements(By.CSS_SELECTOR, ".hoverlayer")),
                  "the hover label")
    assert f"trial {rec['trial_id']}" in hover and all(f"{k} = {v}" in hover for k, v in rec["dims"].items()), hover
    browser.save_screenshot(str(tmp_path / "report_html.png"))
    requested = [json.loads(e["message"])["message"]["params"].get("request", {}).get("url", "")
                 for e in browser.get_log("performance")]
    requested = [u for u in requested if u and not u.startswith(("file:", "data:", "blob:", "about:"))]
    assert requested == [], requested
