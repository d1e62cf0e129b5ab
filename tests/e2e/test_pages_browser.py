"""The pages in a real headless browser: Debian's chromium, driven by selenium, against a real
`gradserve serve` on 127.0.0.1, with every other host made unreachable.

The browser follows links from the model list to model pages, finds their plots drawn (SVG
images with the right titles), sees the live figures change after requests, renders /docs and
/redoc from the server's own files, and logs in with a key through Basic auth. Screenshots go
to $GRADSERVE_SCREENSHOTS (default tests/artifacts/screenshots), printed at the start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

from helpers import ROOT, LiveServer
from service.models import cookbook as cb

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HAS_BENCHMARKS = importlib.util.find_spec("service.models.benchmarks") is not None
KEY = "browser-test-key"
# Compiles on a loaded 2-core CI machine take seconds; waits end as soon as the page is ready.
PATIENCE_S = 180


def _install_chromium() -> str | None:
    """Install Debian's chromium and its driver if missing; None, or why they cannot be had."""
    if CHROMIUM.exists() and DRIVER.exists():
        return None
    if shutil.which("apt-get") is None:
        return "chromium is not installed and this system has no apt-get to install it"
    if os.geteuid() != 0:
        return "chromium is not installed and installing it needs root (apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "chromium", "chromium-driver"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            return f"`{' '.join(command)}` failed: {done.stderr.strip()[-500:]}"
    if not (CHROMIUM.exists() and DRIVER.exists()):
        return "apt-get installed chromium, yet /usr/bin/chromium or chromedriver is missing"
    return None


@pytest.fixture(scope="session")
def screenshots(pytestconfig: pytest.Config) -> Path:
    folder = Path(os.environ.get("GRADSERVE_SCREENSHOTS", ROOT / "tests/artifacts/screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\npage screenshots: {folder.resolve()}")
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator:
    missing = _install_chromium()
    if missing:
        pytest.skip(f"no headless browser: {missing}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="gradserve-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        # Nothing beyond this machine: every host name but 127.0.0.1 fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.set_page_load_timeout(PATIENCE_S)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    models = [str(ROOT / "tests/server/pages_models.py")]
    if HAS_BENCHMARKS:
        models.append("service.models.benchmarks")
    with LiveServer("--models", *models) as live:
        yield live


def _console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _requested_urls(driver) -> list[str]:
    """URLs the browser sent requests for (those a Content-Security-Policy blocked never left)."""
    urls, blocked = {}, set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason"):
            blocked.add(params["requestId"])
    return [url for request_id, url in urls.items() if request_id not in blocked]


def _screenshot(driver, folder: Path, name: str) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 900), 6000))
    driver.save_screenshot(str(folder / f"{name}.png"))
    driver.set_window_size(1280, 900)


def _wait(driver, condition, what: str):
    try:
        return WebDriverWait(driver, PATIENCE_S, poll_frequency=0.2).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}; console: {driver.get_log('browser')}")


_REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
_FETCH_TEXT = """
const done = arguments[arguments.length - 1];
fetch(new URL(arguments[0], location.origin), {credentials: "same-origin"}).then(r => r.text()).then(done, e => done("ERR " + e));
"""

_PLOTS = {
    "logistic_loss": ["direction", "hessian"],
    "tanh_sq_sum": ["direction", "hessian"],
    "banana": ["direction", "contour", "hessian"],
}
_TITLES = {
    "direction": "f along a direction, with its first and second derivatives",
    "contour": "contours of f with its gradient field",
    "hessian": "Hessian at the point and its eigenvalues",
}


def _check_plots(driver, name: str, want: list[str]) -> None:
    images = driver.find_elements(By.CSS_SELECTOR, "img[data-plot]")
    assert [img.get_attribute("data-plot") for img in images] == want
    _wait(
        driver,
        lambda d: all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
            for i in images
        ),
        f"the plots of {name} to load",
    )
    for img, kind in zip(images, want, strict=True):
        title = f"{name}: {_TITLES[kind]}"
        assert img.get_attribute("alt") == title
        svg = driver.execute_async_script(_FETCH_TEXT, img.get_dom_attribute("src"))
        assert f"<title>{title}</title>" in svg, svg[:300]
        assert svg.count("<path") > 20 and len(svg) > 10_000
        width = driver.execute_script("return arguments[0].getBoundingClientRect().width", img)
        assert width > 300  # laid out, not a broken-image icon


@pytest.mark.parametrize("name", list(_PLOTS))
def test_list_links_to_model_pages_whose_plots_render(browser, server, screenshots, name):
    if name == "banana" and not HAS_BENCHMARKS:
        pytest.skip("service.models.benchmarks (the UM-Bridge benchmark models) is not here yet")
    browser.get(f"{server.url}/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "ul.cards"), "the model list")
    if name == "logistic_loss":
        _screenshot(browser, screenshots, "index")
    browser.find_element(By.CSS_SELECTOR, f'a[href="/models/{name}"]').click()
    _wait(browser, lambda d: d.current_url.endswith(f"/models/{name}"), f"the page of {name}")
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith(name)
    _check_plots(browser, name, _PLOTS[name])
    snippets = browser.find_elements(By.CSS_SELECTOR, "pre[data-copy]")
    assert len(snippets) >= 3 and f"/v1/models/{name}/" in snippets[0].text
    assert browser.find_elements(By.CSS_SELECTOR, "button.copy")  # live.js ran
    _screenshot(browser, screenshots, f"model-{name}")
    assert _console_errors(browser) == []


def test_the_plotted_directional_derivative_is_local_jax(browser, server):
    """The page's own data link: d/dt and d2/dt2 of f(x + t v) against local JAX."""
    browser.get(f"{server.url}/models/logistic_loss")
    link = browser.find_element(By.CSS_SELECTOR, "#plot-direction a[href*='direction.json']")
    data = httpx.get(link.get_attribute("href"), timeout=PATIENCE_S).json()
    t, v = np.asarray(data["t"]), np.asarray(data["direction"], np.float32)
    x = np.asarray(data["variables"])[None] + t[:, None] * np.asarray(data["direction"])[None]
    x = x.astype(np.float32)

    def f(z):
        return cb.logistic_loss(z[:3], z[3])

    def slope(z):
        return jax.jvp(f, (z,), (v,))[1]

    for i in (3, 50, 97):
        np.testing.assert_allclose(data["f"][i], f(x[i]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(data["df"][i], slope(x[i]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            data["d2f"][i], jax.jvp(slope, (x[i],), (v,))[1], rtol=1e-4, atol=1e-5
        )


def test_live_figures_update_after_requests(browser, server, screenshots):
    browser.get(f"{server.url}/")
    cell = browser.find_element(By.CSS_SELECTOR, '[data-live="piecewise.requests"]')
    errors = browser.find_element(By.CSS_SELECTOR, '[data-live="piecewise.errors"]')
    requests_before, errors_before = int(cell.text), int(errors.text)
    browser.execute_script("window.gradserveNotReloaded = true")
    with httpx.Client(base_url=server.url, timeout=PATIENCE_S) as client:
        for x in (1.0, 2.0, 4.0):
            assert client.post("/v1/models/piecewise/grad", json={"args": [x]}).status_code == 200
        assert client.post("/v1/models/piecewise/grad", json={"args": [[1, 2]]}).status_code == 422
    _wait(
        browser,
        lambda d: int(cell.text) >= requests_before + 4 and int(errors.text) >= errors_before + 1,
        "the live figures to count the new requests",
    )
    p50 = browser.find_element(By.CSS_SELECTOR, '[data-live="piecewise.p50_ms"]').text
    assert p50.endswith("ms") or p50.endswith(" s")
    assert browser.execute_script("return window.gradserveNotReloaded") is True
    _screenshot(browser, screenshots, "index-after-requests")
    assert _console_errors(browser) == []


def test_docs_and_redoc_render_with_no_network_beyond_this_machine(browser, server, screenshots):
    browser.get_log("performance")  # start from a clean request log
    browser.get(f"{server.url}/docs")
    _wait(
        browser,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 14,
        "Swagger UI to render the operations",
    )
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/v1/models/{name}/grad" in paths and "/v1/models/{name}/hessian" in paths
    _screenshot(browser, screenshots, "docs")
    browser.get(f"{server.url}/redoc")
    _wait(
        browser,
        lambda d: "grad of a model" in d.find_element(By.TAG_NAME, "body").text,
        "ReDoc to render the operations",
    )
    _screenshot(browser, screenshots, "redoc")
    urls = _requested_urls(browser)
    assert any(u.endswith("/static/docs/swagger-ui-bundle.js") for u in urls)
    assert any(u.endswith("/static/docs/redoc.standalone.js") for u in urls)
    outside = [u for u in urls if not u.startswith((server.url, "data:", "blob:", "about:"))]
    assert outside == []
    # ReDoc's sidebar badge always asks its CDN for a logo (hidden when that fails); the
    # page's Content-Security-Policy stops the request before it leaves, and says so.
    assert [e for e in _console_errors(browser) if f"'{_REDOC_LOGO}'" not in e["message"]] == []


def test_with_keys_the_browser_logs_in_with_a_key_as_password(browser, start_server, screenshots):
    keyed = start_server(env={"GRADSERVE_API_KEYS": KEY})
    refused = httpx.get(f"{keyed.url}/")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Basic realm=")
    assert httpx.get(f"{keyed.url}/", auth=("anyone", KEY)).status_code == 200
    # The browser sends the URL's credentials as Basic auth, then reuses them for the page's
    # images and live-figure requests.
    host = keyed.url.removeprefix("http://")
    browser.get(f"http://anyone:{KEY}@{host}/models/logistic_loss")
    _check_plots(browser, "logistic_loss", _PLOTS["logistic_loss"])
    _screenshot(browser, screenshots, "model-with-keys")
    browser.find_element(By.CSS_SELECTOR, 'a[href="/"]').click()
    stamp = _wait(browser, lambda d: d.find_element(By.ID, "live-stamp"), "the model list")
    _wait(browser, lambda d: stamp.text.strip(), "live.js to refresh the figures with the key")
    assert _console_errors(browser) == []
