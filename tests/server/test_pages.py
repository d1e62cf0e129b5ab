"""The pages in-process: what they show, plots equal to local JAX, 4xx pages, escaping, keys."""

from __future__ import annotations

import base64
import re
import shlex
import sys
from html import unescape

import jax
import numpy as np
import pytest

from helpers import ROOT, assert_tree_equal, post
from service.models import cookbook as cb
from tests.server.pages_models import bowl2

PAGES_MODELS = str(ROOT / "tests" / "server" / "pages_models.py")
KEY = "pages-test-key"


@pytest.fixture(scope="module")
def pages():
    """The app in-process with the built-in models and the pages' test models, ready."""
    from starlette.testclient import TestClient

    from service import Settings, create_app

    with TestClient(create_app(Settings(models=[PAGES_MODELS]))) as client:
        yield client


def _f32(x):
    return np.asarray(x, np.float32)


def _along(point: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The points the server evaluated: (x + t v) in float64, rounded to float32."""
    t, v = np.asarray(point["t"]), np.asarray(point["direction"])
    return t, (np.asarray(point["variables"])[None, :] + t[:, None] * v[None, :]).astype(np.float32)


# ---------------------------------------------------------------------------- the list


def test_list_page_shows_models_signatures_and_server(pages):
    page = pages.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    for name in ("tanh", "logistic_loss", "tanh_sq_sum", "mlp_loss", "bowl2"):
        assert f'href="/models/{name}"' in html
    assert "Negative log-likelihood of the seed" in html
    assert "W: float32[3]" in html and "b: float32[]" in html
    assert "x: float32[*,784]" in html and "y: int32[*]" in html
    assert "eval · grad · value_and_grad" in html
    assert "server-held parameters: yes" in html  # mlp's config
    for link in ('href="/docs"', 'href="/metrics"', 'href="/redoc"'):
        assert link in html
    assert 'data-live="server.version"' in html and 'data-live="tanh.p99_ms"' in html
    devices = pages.get("/live.json").json()["server"]["devices"]
    assert devices and all(d in html for d in devices)


def test_markup_in_a_model_description_is_escaped(pages):
    html = pages.get("/").text
    assert "<script>alert(" not in html and "<b>bold</b>" not in html
    assert "&lt;b&gt;bold&lt;/b&gt; &lt;script&gt;alert(" in html


def test_live_figures_count_requests_errors_and_batches(pages):
    before = pages.get("/live.json").json()["models"]["square3"]
    for x in (1.0, 2.0, 3.0):
        post(pages, "square3", "grad", args=[np.float32(x)])
    assert pages.post("/v1/models/square3/grad", json={"args": [[1, 2]]}).status_code == 422
    after = pages.get("/live.json").json()
    now = after["models"]["square3"]
    assert now["requests"] == before["requests"] + 4
    assert now["errors"] == before["errors"] + 1
    assert now["p50_ms"] > 0 and now["p99_ms"] >= now["p50_ms"]
    assert now["mean_batch"] >= 1 and now["compiles"] >= 1
    assert after["text"]["square3.requests"] == str(now["requests"])
    assert after["server"]["uptime_s"] > 0 and after["server"]["queue_depth"] == 0


# ---------------------------------------------------------------------------- one model


def test_model_page_shows_signature_value_plots_and_snippets(pages):
    page = pages.get("/models/logistic_loss")
    assert page.status_code == 200
    html = unescape(page.text)
    assert "0: W" in html and "float32[3]" in html and "1: b" in html
    w, b = _f32([0.5, -0.4, 0.8]), np.float32(0.1)
    want = float(cb.logistic_loss(w, b))
    assert re.search(r"float32\[\] = ([-0-9.e]+)", html)
    assert np.isclose(float(re.search(r"float32\[\] = ([-0-9.e]+)", html).group(1)), want)
    kinds = re.findall(r'data-plot="(\w+)"', html)
    assert kinds == ["direction", "hessian"]
    for kind in kinds:
        assert f'src="/models/logistic_loss/plots/{kind}.svg' in html
    assert 'href="/v1/models/logistic_loss"' in html


def test_curl_snippet_is_copy_ready(pages):
    """The curl snippet's URL and body, sent as they are, give local JAX's gradient."""
    html = unescape(pages.get("/models/logistic_loss").text)
    command = re.search(r"<pre data-copy><code>(curl .*?)</code></pre>", html, re.S).group(1)
    words = shlex.split(command.replace("\\\n", " "))
    url, body = words[2], words[words.index("-d") + 1]
    assert url.endswith("/v1/models/logistic_loss/grad")
    response = pages.post(url, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    got = post(
        pages, "logistic_loss", "grad", **{"args": [_f32([0.5, -0.4, 0.8]), np.float32(0.1)]}
    )
    want = jax.grad(cb.logistic_loss)(_f32([0.5, -0.4, 0.8]), np.float32(0.1))
    assert_tree_equal(got["grad"], want)
    assert "umbridge.HTTPModel" in html and '"logistic_loss"' in html
    assert 'as_jax(Client("http://testserver").model("logistic_loss"))' in html
    assert "np.array([0.5, -0.4, 0.8], np.float32), np.array(0.1, np.float32)" in html


@pytest.mark.parametrize(
    ("name", "fn", "n"),
    [("logistic_loss", cb.logistic_loss, 4), ("tanh_sq_sum", cb.tanh_sq_sum, 6)],
)
def test_plotted_directional_derivatives_equal_local_jax(pages, name, fn, n):
    data = pages.get(f"/models/{name}/plots/direction.json").json()
    t, points = _along(data, n)
    v = _f32(data["direction"])
    shapes = [np.shape(a) for a in data["point"]]

    def g(flat):  # the model as a function of the flat variables
        parts, at = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(flat[at : at + size].reshape(shape))
            at += size
        return fn(*parts)

    def slope(x):
        return jax.jvp(g, (x,), (v,))[1]

    for i in (0, 17, len(t) // 2, len(t) - 1):
        x = points[i]
        np.testing.assert_allclose(data["f"][i], g(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(data["df"][i], slope(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            data["d2f"][i], jax.jvp(slope, (x,), (v,))[1], rtol=1e-4, atol=1e-5
        )
    assert t[0] == -1 and t[-1] == 1 and len(t) == 101
    assert np.isclose(np.linalg.norm(data["direction"]), 1, atol=1e-6)


def test_plotted_hessian_and_jacobian_equal_local_jax(pages):
    params = {"W": _f32([0.5, -0.4, 0.8]), "b": np.float32(0.1)}
    data = pages.get("/models/logistic_loss_dict/plots/hessian.json").json()
    h = jax.hessian(lambda w, b: cb.logistic_loss_dict({"W": w, "b": b}), argnums=(0, 1))(
        params["W"], params["b"]
    )
    want = np.block([[h[0][0], h[0][1][:, None]], [h[1][0][None, :], np.reshape(h[1][1], (1, 1))]])
    np.testing.assert_allclose(data["hessian"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        data["eigenvalues"], np.linalg.eigvalsh((want + want.T) / 2), rtol=1e-4, atol=1e-5
    )

    data = pages.get("/models/logistic_predict/plots/jacobian.json").json()
    jw, jb = jax.jacrev(cb.logistic_predict, argnums=(0, 1))(params["W"], params["b"])
    np.testing.assert_allclose(data["jacobian"], np.column_stack([jw, jb]), rtol=1e-5, atol=1e-6)


def test_contour_map_of_a_two_variable_model_equals_local_jax(pages):
    page = pages.get("/models/bowl2")
    assert re.findall(r'data-plot="(\w+)"', page.text) == ["direction", "contour", "hessian"]
    data = pages.get("/models/bowl2/plots/contour.json?grid=9&span=0.5").json()
    xs, ys = _f32(data["x"]), _f32(data["y"])
    assert len(xs) == 9 and np.isclose(xs[0], 0.0) and np.isclose(ys[-1], 0.25)
    for i, j in ((0, 0), (4, 7), (8, 3)):
        x = _f32([xs[j], ys[i]])
        value, grad = jax.value_and_grad(bowl2)(x)
        np.testing.assert_allclose(data["f"][i][j], value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            [data["grad_x"][i][j], data["grad_y"][i][j]], grad, rtol=1e-5, atol=1e-6
        )
    svg = pages.get("/models/bowl2/plots/contour.svg?grid=9&span=0.5")
    assert svg.headers["content-type"] == "image/svg+xml"
    assert "<title>bowl2: contours of f with its gradient field</title>" in svg.text


def test_svgs_carry_their_titles(pages):
    for kind, title in (
        ("direction", "tanh_sq_sum: f along a direction, with its first and second derivatives"),
        ("hessian", "tanh_sq_sum: Hessian at the point and its eigenvalues"),
    ):
        svg = pages.get(f"/models/tanh_sq_sum/plots/{kind}.svg")
        assert svg.status_code == 200
        assert f"<title>{title}</title>" in svg.text and "<path" in svg.text


def test_plots_are_computed_once_per_model_point_and_plot(pages):
    def computes() -> float:
        text = pages.get("/metrics").text
        return float(re.search(r'gradserve_phase_seconds_count\{phase="compute"\} (\S+)', text)[1])

    url = "/models/tanh/plots/jacobian.svg?point=[[0.25,0.5,1.0]]"
    assert pages.get(url).status_code == 200
    before = computes()
    assert pages.get(url).status_code == 200
    assert pages.get(url.replace(".svg", ".json")).status_code == 200
    assert computes() == before
    assert pages.get(url.replace("1.0", "2.0")).status_code == 200
    assert computes() == before + 1


def test_a_point_from_the_query_string(pages):
    page = pages.get("/models/tanh_sq_sum", params={"point": "[[1.0, -2.0]]", "samples": "11"})
    assert page.status_code == 200
    assert "float32[] = " in page.text
    data = pages.get("/models/tanh_sq_sum/plots/direction.json?point=[[1.0,-2.0]]&samples=11")
    assert data.json()["point"] == [[1.0, -2.0]] and len(data.json()["t"]) == 11
    hessian = pages.get("/models/tanh_sq_sum/plots/hessian.json?point=[[1.0,-2.0]]").json()
    want = jax.hessian(cb.tanh_sq_sum)(_f32([1.0, -2.0]))
    np.testing.assert_allclose(hessian["hessian"], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("samples=100000", 422, "samples"),
        ("samples=2", 422, "[3, 401]"),
        ("samples=ten", 400, "whole number"),
        ("grid=1000", 422, "[5, 101]"),
        ("span=-1", 422, "span"),
        ("span=1e300", 422, "span"),
        ("span=nan", 422, "span"),
        ("box=1,0,0,1", 422, "xmin &lt; xmax"),
        ("box=0,1,2", 400, "4 comma-separated"),
        ("direction=[1,2]", 422, "4 variables"),
        ("direction=[0,0,0,0]", 422, "zero"),
        ("point=[[1,2,3,4],0.5]", 422, "expects float32[3], got float32[4]"),
        ("point={}", 422, "JSON list"),
        ("point=[[1,2,3],", 400, "not valid JSON"),
        pytest.param("point=" + "1" * 20000, 413, "limit", id="point-too-long"),
    ],
)
def test_bad_plot_parameters_get_a_4xx_page(pages, query, status, words):
    for path in ("/models/logistic_loss", "/models/logistic_loss/plots/direction.svg"):
        page = pages.get(f"{path}?{query}")
        assert page.status_code == status, (path, page.text[:500])
        assert page.headers["content-type"].startswith("text/html")
        assert words in page.text


def test_markup_in_the_query_and_path_is_escaped(pages):
    markup = "<script>alert('x')</script>"
    for url in (
        f"/models/logistic_loss?point={markup}",
        f'/models/logistic_loss?point=[{{"{markup}": 1}}, 0.5]',
        f"/models/{markup}",
        f"/models/logistic_loss/plots/{markup}.svg",
    ):
        page = pages.get(url)
        assert 400 <= page.status_code < 500, url
        assert "<script>alert" not in page.text
        assert "&lt;script&gt;alert(" in page.text


def test_unknown_model_and_plot_are_404_pages(pages):
    page = pages.get("/models/nope")
    assert page.status_code == 404 and "no model named &#39;nope&#39;" in page.text
    assert pages.get("/models/tanh/plots/spiral.svg").status_code == 404
    assert pages.get("/models/conj").status_code == 200  # complex: no plots, says why
    assert "real floating-point outputs" in pages.get("/models/conj").text


def test_without_matplotlib_pages_show_all_but_plots(pages, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    page = pages.get("/models/logistic_loss")
    assert page.status_code == 200
    assert "pip install 'gradserve[ui]'" in page.text and "<img" not in page.text
    assert "Signature" in page.text and "curl -s" in page.text
    svg = pages.get("/models/logistic_loss/plots/direction.svg?samples=5")
    assert svg.status_code == 501 and "gradserve[ui]" in svg.text
    assert pages.get("/models/logistic_loss/plots/direction.json?samples=5").status_code == 200


# ---------------------------------------------------------------------------- docs, keys


def test_docs_and_redoc_load_their_files_from_this_server(pages):
    for path, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = pages.get(path).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert urls and all(u.startswith("/") for u in urls), urls
        assert f"/static/docs/{asset}" in urls
        asset_response = pages.get(f"/static/docs/{asset}")
        assert asset_response.status_code == 200 and len(asset_response.content) > 100_000
    assert "validatorUrl" in pages.get("/docs").text
    assert pages.get("/static/style.css").status_code == 200


def _basic(password: str, user: str = "me") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_with_keys_pages_ask_the_browser_for_a_key(app_factory):
    with app_factory(api_keys=f"{KEY},metrics-only:metrics") as c:
        for path in ("/", "/models/tanh", "/models/tanh/plots/jacobian.svg", "/live.json"):
            refused = c.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"].startswith("Basic realm=")
            assert c.get(path, headers=_basic("wrong")).status_code == 401
        assert c.get("/", headers=_basic(KEY)).status_code == 200
        assert c.get("/", headers=_basic(KEY, user="")).status_code == 200
        assert c.get("/models/tanh", headers=_basic(KEY)).status_code == 200
        assert c.get("/models/tanh", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # A key that may only read metrics sees the list, and cannot make a page compute.
        assert c.get("/", headers=_basic("metrics-only")).status_code == 200
        assert c.get("/models/tanh", headers=_basic("metrics-only")).status_code == 403
        # The API keeps its Bearer challenge; static files and the docs stay open.
        assert c.get("/v1/models").headers["www-authenticate"].startswith("Bearer")
        assert c.get("/static/style.css").status_code == 200
        assert c.get("/docs").status_code == 200
        assert c.get("/static/docs/swagger-ui.css").status_code == 200
        snippet = unescape(c.get("/models/tanh", headers=_basic(KEY)).text)
        assert "Authorization: Bearer $GRADSERVE_KEY" in snippet and "api_key=" in snippet


def test_plots_need_the_same_engine_path_as_the_api(app_factory):
    """A deadline reaches the pages: a plot that cannot finish in time is a 504 page."""
    with app_factory(request_timeout_s=1e-6) as c:
        page = c.get("/models/tanh_sq_sum/plots/hessian.svg")
        assert page.status_code == 504 and "did not finish" in page.text
        assert c.get("/models/tanh_sq_sum").status_code == 504


def test_every_model_page_renders_and_every_plot_it_shows_draws(pages):
    names = re.findall(r'<h3 id="m-\d+"><a href="/models/([\w.-]+)">', pages.get("/").text)
    assert len(names) >= 15
    for name in names:
        page = pages.get(f"/models/{name}")
        assert page.status_code == 200, (name, page.text[-800:])
        for src in re.findall(r'<img src="([^"]+)"', page.text):
            svg = pages.get(unescape(src))
            assert svg.status_code == 200, (name, src, svg.text[-800:])
            assert svg.headers["content-type"] == "image/svg+xml"


def test_config_options_shown_on_pages_and_in_the_model_info():
    """`banana`'s config options (service.models.benchmarks) on its page and in /v1/models."""
    from starlette.testclient import TestClient

    from service import Settings, create_app

    settings = Settings(models=["service.models.benchmarks"], builtin_models=False, warmup=False)
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/models/banana").json()
        assert [o["name"] for o in info["config"]] == ["a", "b", "scale"]
        assert "linearize" in info["ops"]
        page = client.get("/models/banana")
        assert page.status_code == 200, page.text[-500:]
        for option in info["config"]:
            assert f"config {option['name']}" in page.text
        assert client.get("/").status_code == 200
