"""The station page end to end in a real headless Chromium: watch, label, train, swap, try.

Needs the Debian packages chromium and chromium-driver. Without them the test is skipped,
unless EDGE_INSPECT_REQUIRE_BROWSER=1 (set by .ci/run), where it fails instead. Screenshots
go to test-artifacts/page/ (or $EDGE_INSPECT_ARTIFACTS/page/) for people to look at.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Broker, Certificates, write_config

from edge.access import hash_password
from edge.station import Station

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
CHROMEDRIVER = shutil.which("chromedriver")

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("EDGE_INSPECT_REQUIRE_BROWSER") == "1":
        raise RuntimeError("chromium and chromedriver are needed (apt install chromium-driver)")
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

# Flags for a quiet, self-contained browser: nothing fetched from the internet, no GPU.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture
def artifacts() -> Path:
    out = Path(os.environ.get("EDGE_INSPECT_ARTIFACTS", ROOT / "test-artifacts")) / "page"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


@pytest.fixture
def browser(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    flags = [*FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900"]
    # A station's own certificate, as a user would accept it once; the test's CA is not the
    # system's, and Chromium's trust store is not ours to change.
    flags += getattr(request, "param", [])
    for flag in flags:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _seed_dataset(dataset: Path, parts: Path) -> None:
    """The good and defective parts a line engineer has labelled before: one in five held back
    for testing, as the page's own capture does."""
    for label, folder in (("normal", "train/normal"), ("anomaly", "train/anomaly")):
        for i, path in enumerate(sorted((parts / folder).iterdir())):
            split = "test" if i % 5 == 4 else "train"
            (dataset / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dataset / split / label / path.name)


def test_watch_label_train_swap_and_try_in_a_browser(
    tmp_path: Path,
    parts: Path,
    parts_model: Path,
    replay: Path,
    broker: Broker,
    run_station: Callable[[Path], Station],
    browser: WebDriver,
    artifacts: Path,
) -> None:
    model = tmp_path / "models" / "current.onnx"
    model.parent.mkdir()
    shutil.copy(parts_model, model)
    _seed_dataset(tmp_path / "state" / "dataset", parts)
    config = write_config(
        tmp_path,
        model,
        replay,
        broker,
        "page/e2e",
        source={"fps": 5},
        web={"enabled": True, "port": 0},
    )
    station = run_station(config)
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    wait.until(lambda _: station.web is not None and station.web.port)
    assert station.web is not None
    first_model = station.model.id
    find = browser.find_element

    def text(element_id: str) -> str:
        return str(find(By.ID, element_id).text)

    def shot(name: str) -> None:
        browser.save_screenshot(str(artifacts / f"{name}.png"))

    # Live: the picture arrives and is replaced by newer frames; the strip shows the station.
    browser.get(f"http://127.0.0.1:{station.web.port}/")
    live = find(By.ID, "live-img")
    wait.until(lambda _: live.get_attribute("data-frame"))
    frame = int(live.get_attribute("data-frame") or 0)
    wait.until(lambda _: int(live.get_attribute("data-frame") or 0) > frame)
    wait.until(lambda _: text("st-broker") == "connected" and text("st-fps")[:1].isdigit())
    assert text("st-state") == "online"
    assert text("st-model") == first_model
    assert text("live-caption").split(" ")[0] in ("OK", "NG")
    shot("1-live")

    # Label the frame on screen, by what it shows.
    caption = text("live-caption")
    label = "anomaly" if caption.startswith("NG") else "normal"
    find(By.ID, f"capture-{label}").click()
    wait.until(lambda _: "added as" in text("message"))
    assert f"added as {'good' if label == 'normal' else 'defect'}" in text("message")
    captured = list((tmp_path / "state" / "dataset").rglob("cap-*.png"))
    assert len(captured) == 1 and f"train/{label}/" in captured[0].as_posix()

    # The dataset shows every image, with its label and split.
    find(By.CSS_SELECTOR, 'nav a[data-tab="dataset"]').click()
    wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#dataset-grid .card")) == 27)
    good, bad = (17, 5) if label == "normal" else (16, 6)
    assert text("dataset-counts").startswith(f"Training: {good} good, {bad} defects")
    shot("2-dataset")

    # Train in the background, see the new model judged next to the running one, swap it in.
    find(By.CSS_SELECTOR, 'nav a[data-tab="train"]').click()
    find(By.ID, "train-start").click()
    WebDriverWait(browser, 120, poll_frequency=0.2).until(
        lambda _: (
            find(By.ID, "train-state").get_attribute("data-state") in ("done", "failed")
            and find(By.ID, "result").is_displayed()
        )
    )
    assert find(By.ID, "train-state").get_attribute("data-state") == "done", text("train-state")
    candidate = text("cand-id")
    assert candidate and candidate != first_model
    rows = browser.find_elements(By.CSS_SELECTOR, "#compare tbody tr")
    assert [r.find_element(By.TAG_NAME, "th").text for r in rows][:2] == [
        "AUROC",
        "average precision",
    ]
    wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#compare-grid img")) >= 2 * 5)
    shot("3-trained")
    find(By.ID, "activate").click()
    wait.until(lambda _: text("st-model") == candidate)
    assert station.model.id == candidate
    assert model.read_bytes() == (station.web.trainer.candidate_dir / "model.onnx").read_bytes()
    wait.until(lambda _: "replaced" in text("model-event"))
    wait.until(lambda _: not find(By.ID, "rollback").get_attribute("hidden"))
    assert text("rollback") == f"Go back to model {first_model}"
    shot("4-swapped")

    # Trial detection: upload a defective and a good part, see verdicts and overlays.
    find(By.CSS_SELECTOR, 'nav a[data-tab="try"]').click()
    bad = sorted((parts / "test" / "anomaly").iterdir())[0]
    good = sorted((parts / "test" / "normal").iterdir())[0]
    find(By.ID, "trial-files").send_keys(f"{bad}\n{good}")
    wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#trial-grid .card")) == 2)
    verdicts = [
        c.find_element(By.CSS_SELECTOR, ".body span:nth-child(2)").text.split(" ")[0]
        for c in browser.find_elements(By.CSS_SELECTOR, "#trial-grid .card")
    ]
    assert verdicts == ["NG", "OK"]
    shot("5-trial")

    # History: the newest verdicts, one opened to its saved picture.
    find(By.CSS_SELECTOR, 'nav a[data-tab="history"]').click()
    find(By.ID, "history-ng").click()
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#history-table tbody tr"))
    browser.find_elements(By.CSS_SELECTOR, "#history-table tbody tr")[0].click()
    wait.until(lambda _: find(By.ID, "record").is_displayed())
    overlay = find(By.ID, "record-overlay")
    wait.until(lambda _: browser.execute_script("return arguments[0].naturalWidth", overlay) > 0)
    shot("6-history")

    # The same page on a phone-sized screen.
    browser.set_window_size(390, 844)
    frame = int(live.get_attribute("data-frame") or 0)
    find(By.CSS_SELECTOR, 'nav a[data-tab="live"]').click()
    wait.until(lambda _: int(live.get_attribute("data-frame") or 0) > frame)
    assert f"threshold {station.model.threshold:.4f}" in text("live-caption")

    # Pause while labelling by hand, then resume. Paused, the picture says it is not now.
    find(By.ID, "pause").click()
    wait.until(lambda _: text("st-state") == "paused" and find(By.ID, "resume").is_displayed())
    wait.until(lambda _: find(By.ID, "live-stale").is_displayed())
    assert text("live-stale").startswith("inspection paused: this picture is from")
    assert "stale" in (find(By.ID, "live").get_attribute("class") or "")
    shot("7-live-paused-phone")
    find(By.ID, "resume").click()
    wait.until(lambda _: text("st-state") == "online" and find(By.ID, "pause").is_displayed())
    wait.until(lambda _: not find(By.ID, "live-stale").is_displayed())
    shot("8-live-phone")

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    # A restarted station has a new CSRF token: the open page takes it and the button works
    # (every button failed with "no valid CSRF token" until the page was reloaded by hand).
    station.web.sessions.local_csrf = "a token made by a new start of the station"
    find(By.ID, "pause").click()
    wait.until(lambda _: text("st-state") == "paused")
    assert "CSRF" not in text("message")
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("403" in e for e in errors), errors  # the one refused before the new token


@pytest.mark.parametrize("browser", [["--ignore-certificate-errors"]], indirect=True)
def test_log_in_and_out_over_https_in_a_browser(
    tmp_path: Path,
    parts_model: Path,
    replay: Path,
    certificates: Certificates,
    run_station: Callable[[Path], Station],
    browser: WebDriver,
    artifacts: Path,
) -> None:
    """A page opened to the network, with a password and a certificate, as a browser sees it."""
    config = write_config(
        tmp_path,
        parts_model,
        replay,
        None,
        "page/tls",
        station={"name": "line3-st2"},
        web={
            "enabled": True,
            "port": 0,
            "password_hash": hash_password("press 4 seal"),
            "tls_cert": str(certificates.server_cert),
            "tls_key": str(certificates.server_key),
        },
    )
    station = run_station(config)
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    wait.until(lambda _: station.web is not None and station.web.port)
    assert station.web is not None
    find = browser.find_element

    browser.get(f"https://127.0.0.1:{station.web.port}/")
    wait.until(lambda _: find(By.ID, "login").is_displayed())
    assert not find(By.ID, "app").is_displayed() and not find(By.ID, "logout").is_displayed()
    # The hidden user name tells a password manager which station the password is for.
    assert find(By.ID, "username").get_attribute("value") == "line3-st2"
    find(By.ID, "password").send_keys("not it")
    find(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(lambda _: "wrong password" in find(By.ID, "message").text)
    browser.save_screenshot(str(artifacts / "tls-1-wrong-password.png"))
    time.sleep(2.1)  # a wrong password locks the address out for 2 s
    find(By.ID, "password").clear()
    find(By.ID, "password").send_keys("press 4 seal")
    find(By.CSS_SELECTOR, "#login-form button").click()
    live = find(By.ID, "live-img")
    wait.until(lambda _: live.get_attribute("data-frame"))
    cookie = browser.get_cookie("edge_inspect_session")
    assert cookie is not None and cookie["secure"] and cookie["httpOnly"]
    browser.save_screenshot(str(artifacts / "tls-2-live.png"))

    find(By.ID, "logout").click()
    wait.until(lambda _: find(By.ID, "login").is_displayed())
    assert browser.get_cookie("edge_inspect_session") is None
