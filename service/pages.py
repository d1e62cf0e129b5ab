"""The pages: what a browser sees. A list of the models with live figures, one page per model
(signature, copy-ready snippets, plots around a point), and /docs and /redoc served offline.

A front door like the others: it translates its protocol (HTML and query strings) and sends
every computation through the one shared path (prepare -> engine -> package), so limits,
deadlines, batching and metrics reach the pages too. Templates are Jinja2's, autoescaped: no
value a client sends reaches a page unescaped. No third-party JavaScript: the one script
(`static/live.js`) only refreshes the live figures and adds copy buttons, and every page reads
the same without it.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus, urlencode

import jax
import jinja2
import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from client.errors import APIError, InvalidInput, ModelNotFound, ServerError
from client.specs import ArraySpec, describe_array
from service import docs, drawing, live, plots
from service.calls import prepare
from service.plot_query import MAX_POINT_ELEMENTS, PlotParams
from service.registry import Model
from service.state import State
from service.transforms import package

router = APIRouter(include_in_schema=False)
_HERE = Path(__file__).parent
STATIC = "/static"
TITLES = {
    "direction": "f along a direction, with its first and second derivatives",
    "contour": "contours of f with its gradient field",
    "jacobian": "Jacobian at the point",
    "hessian": "Hessian at the point and its eigenvalues",
}
# Pages load only their own stylesheet, script and images: no other origin, no inline code.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Pages:
    """What the pages keep per app: templates, the plot cache and the start time."""

    def __init__(self, with_keys: bool) -> None:
        self.with_keys = with_keys
        self.started = time.monotonic()
        self.cache = plots.PlotCache()
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(static=STATIC, **context)
        return HTMLResponse(html, status, headers=_PAGE_HEADERS)


def install(app: FastAPI, with_keys: bool) -> None:
    """Add the pages, the offline docs and the static files to `app`."""
    import fastapi_offline

    app.state.pages = Pages(with_keys)
    app.include_router(router)
    app.include_router(docs.router)
    # Swagger UI's and ReDoc's files as fastapi-offline ships them (mounted before /static).
    offline = Path(fastapi_offline.__file__).parent / "static"
    app.mount(f"{STATIC}/docs", StaticFiles(directory=offline), name="docs-assets")
    app.mount(STATIC, StaticFiles(directory=str(files("service") / "static")), name="static")


def _pages(request: Request) -> Pages:
    return request.app.state.pages


def _state(request: Request) -> State:
    return request.app.state.gradserve


def html_errors(endpoint: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Errors on a page are pages too: the same status, code and detail, as HTML."""

    @functools.wraps(endpoint)
    async def wrapped(request: Request, **kwargs: Any) -> Response:
        try:
            return await endpoint(request, **kwargs)
        except APIError as e:
            page = _pages(request).render(
                "error.html",
                e.status,
                error=e,
                # Decoded, as a person typed it (the template escapes it).
                asked=unquote(request.url.path)
                + (f"?{unquote_plus(request.url.query)}" if request.url.query else ""),
                request_id=request.scope.get("state", {}).get("request_id"),
            )
            page.headers.update({k: v for k, v in e.headers.items() if k.lower() == "retry-after"})
            return page

    return wrapped


# ---------------------------------------------------------------------------- the model list


@router.get("/", response_class=HTMLResponse)
@html_errors
async def index(request: Request) -> Response:
    state = _state(request)
    figures = live.snapshot(state, _pages(request).started)
    return _pages(request).render(
        "index.html",
        models=[_describe(state, m) for m in state.registry],
        server=figures["server"],
        text=live.text(figures),
    )


@router.get("/live.json")
async def live_json(request: Request) -> JSONResponse:
    """The live figures, for `static/live.js` to refresh the pages with."""
    figures = live.snapshot(_state(request), _pages(request).started)
    return JSONResponse(
        {**figures, "text": live.text(figures)}, headers={"Cache-Control": "no-store"}
    )


def _describe(state: State, model: Model) -> dict[str, Any]:
    info = state.describe(model, full=True)
    spec = model.spec
    names = plots.parameter_names(model)
    inputs = (
        None
        if spec.inputs is None
        else [
            (names[i] if i < len(names) else f"arg{i}", _spec_text(s))
            for i, s in enumerate(spec.inputs)
        ]
    )
    config = {
        k: v
        for k, v in (
            ("device", spec.device),
            ("replicas", spec.replicas if spec.replicas != 1 else None),
            ("max_batch_size", spec.max_batch_size),
            ("warmup_batch_size", spec.warmup_batch_size or None),
            ("server-held parameters", "yes" if model.has_params else None),
        )
        if v is not None
    }
    config.update(
        {f"config {o['name']}": f"{o['type']} = {o['default']!r}" for o in info["config"]}
    )
    return {**info, "inputs_text": inputs, "output_text": _spec_text(spec.output), "config": config}


def _spec_text(spec: Any) -> str:
    if spec is None:
        return "any (not declared)"
    if isinstance(spec, ArraySpec):
        return spec.describe()
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k}: {_spec_text(v)}" for k, v in spec.items()) + "}"
    inner = ", ".join(_spec_text(v) for v in spec)
    return f"({inner})" if isinstance(spec, tuple) else f"[{inner}]"


# ---------------------------------------------------------------------------- one model


async def _run(request: Request, model: Model, op: str, doc: dict[str, Any]) -> dict[str, Any]:
    """One computation through the shared path, as the v1 routes make it."""
    state = _state(request)
    call = await run_in_threadpool(prepare, model, op, doc, state.settings)
    request.app.state.shape_budget.admit(call)
    outcome = await state.engine.submit(call)
    request.scope["gradserve.batch"] = outcome.batch_size
    return package(call.op, call.program, outcome.value)


async def _point(request: Request, model: Model, params: PlotParams) -> tuple[Any, Any]:
    """The point's JSON args and its decoded, checked `Point` (None, None: no point known)."""
    raw = params.point if params.point is not None else plots.default_point(model)
    if raw is None:
        return None, None
    call = await run_in_threadpool(prepare, model, "eval", {"args": raw}, _state(request).settings)
    point = plots.Point(call.args)
    size = sum(x.size for x in jax.tree.leaves(call.args))
    if size > MAX_POINT_ELEMENTS:
        raise InvalidInput(
            f"the point has {size} elements; the pages plot at most {MAX_POINT_ELEMENTS}",
            code="invalid_plot_parameter",
            loc=("query", "point"),
        )
    return raw, point


def _model(request: Request, name: str, label: str) -> Model:
    state = _state(request)
    model = state.registry.get(name)
    request.scope["gradserve.labels"] = (name, label)
    state.raise_unless_ready()
    return model


@router.get("/models/{name}", response_class=HTMLResponse)
@html_errors
async def model_page(request: Request, name: str) -> Response:
    model = _model(request, name, "page")
    state, pages = _state(request), _pages(request)
    params = PlotParams.from_query(request.query_params)
    raw, point = await _point(request, model, params)
    value, kinds, why = None, [], "this model declares no inputs: give a point as ?point=[...]"
    if point is not None and point.n:
        plots.check(point, params)
    if point is not None:
        value = (await _run(request, model, "eval", {"args": raw}))["value"]
        kinds, why = plots.applicable(point, value)
    query = params.query()  # the plots' own requests find the default point themselves
    figures = [
        {
            "kind": kind,
            "title": f"{name}: {TITLES[kind]}",
            "svg": f"/models/{name}/plots/{kind}.svg?{urlencode(query)}",
            "data": f"/models/{name}/plots/{kind}.json?{urlencode(query)}",
        }
        for kind in kinds
    ]
    snapshot = live.snapshot(state, pages.started)
    return pages.render(
        "model.html",
        model=_describe(state, model),
        params=params,
        point_json=json.dumps(raw) if raw is not None else "",
        direction_json=json.dumps(list(params.direction)) if params.direction else "",
        box_text=",".join(f"{v:g}" for v in params.box) if params.box else "",
        value=_value_text(value),
        figures=figures if drawing.available() else [],
        plots_missing=bool(figures) and not drawing.available(),
        why=why if not figures else None,
        variables=point.n if point is not None else 0,
        snippets=_snippets(request, model, raw, point, value),
        text=live.text(snapshot),
    )


def _value_text(value: Any) -> str | None:
    if value is None:
        return None
    if not hasattr(value, "dtype"):
        return "a pytree of arrays"
    x = np.asarray(value)
    shown = np.array2string(x, precision=6, threshold=12, separator=", ", max_line_width=100)
    return f"{describe_array(x)} = {shown}"


def _python(raw: Any, decoded: Any) -> str:
    """Python source for the point's arguments: numpy arrays in the dtypes the server uses."""
    if isinstance(decoded, dict):
        return "{" + ", ".join(f"{k!r}: {_python(raw[k], v)}" for k, v in decoded.items()) + "}"
    if isinstance(decoded, (list, tuple)):
        inner = ", ".join(_python(r, d) for r, d in zip(raw, decoded, strict=True))
        return f"({inner},)" if isinstance(decoded, tuple) else f"[{inner}]"
    plain = raw if isinstance(raw, (int, float, list)) else np.asarray(decoded).tolist()
    return f"np.array({json.dumps(plain)}, np.{np.asarray(decoded).dtype})"


def _snippets(request: Request, model: Model, raw: Any, point: Any, value: Any) -> dict:
    base = str(request.base_url).rstrip("/")
    keyed = _pages(request).with_keys
    args = json.dumps(raw if raw is not None else [], separators=(", ", ": "))
    scalar = value is not None and hasattr(value, "shape") and np.ndim(value) == 0
    op = "grad" if scalar else "jacobian"
    return {
        "op": op,
        "base": base,
        "keyed": keyed,
        "args": args,
        "python_args": _python(raw, list(point.args)) if point is not None else "[]",
        "shell_args": args.replace("'", "'\\''"),
        "argnums": "" if len(raw or []) < 2 else f", argnums={tuple(range(len(raw)))}",
        "umbridge": _umbridge_input(raw, model),
    }


def _umbridge_input(raw: Any, model: Model) -> str | None:
    """UM-Bridge takes each input as a flat list of floats: only array inputs map onto it."""
    if raw is None or any(isinstance(a, dict) for a in raw):
        return None
    specs = model.spec.inputs or [None] * len(raw)
    for spec in specs:
        if isinstance(spec, ArraySpec) and spec.dtype and not spec.dtype.startswith("float"):
            return None
    return json.dumps([np.ravel(np.asarray(a, np.float64)).tolist() for a in raw])


# ---------------------------------------------------------------------------- plots


@router.get("/models/{name}/plots/{file}")
@html_errors
async def plot(request: Request, name: str, file: str) -> Response:
    kind, _, ext = file.partition(".")
    if kind not in plots.KINDS or ext not in ("svg", "json"):
        raise ModelNotFound(
            f"no plot {file!r}; plots are {', '.join(k + '.svg' for k in plots.KINDS)} "
            "(and .json for their data)",
            code="not_found",
        )
    model = _model(request, name, "plot")
    params = PlotParams.from_query(request.query_params)
    raw, point = await _point(request, model, params)
    if point is None:
        raise InvalidInput(f"'{name}' declares no inputs: give ?point=[...]", code="no_point")
    relevant = {
        "direction": (params.direction, params.span, params.samples),
        "contour": (params.span, params.grid, params.box),
    }.get(kind, ())
    key = (name, kind, point.key, relevant)
    cache = _pages(request).cache

    async def compute() -> dict[str, Any]:
        return await plots.COMPUTE[kind](point, params, functools.partial(_run, request, model))

    data = await cache.get((*key, "data"), compute)
    if ext == "json":
        body = {"model": name, "plot": kind, "point": raw, **_plain(data)}
        return JSONResponse(body, headers={"Cache-Control": "private, max-age=300"})
    if not drawing.available():
        raise ServerError(
            "plots need matplotlib: pip install 'gradserve[ui]'; their data is at "
            f"/models/{name}/plots/{kind}.json",
            code="plots_unavailable",
            status=501,
        )
    title = f"{name}: {TITLES[kind]}"

    async def draw() -> bytes:
        return await run_in_threadpool(_draw, kind, data, title, point, model)

    svg = await cache.get((*key, "svg"), draw)
    return Response(
        svg,
        media_type="image/svg+xml",
        headers={
            "Cache-Control": "private, max-age=300",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _draw(kind: str, data: dict[str, Any], title: str, point: plots.Point, model: Model) -> bytes:
    names = point.names(model)
    if kind == "direction":
        return drawing.direction(data, title)
    if kind == "contour":
        labels = [n if size == 1 else f"{n}[{i}]" for n, size in names for i in range(size)]
        return drawing.contour(data, title, (labels[0], labels[1]))
    if kind == "jacobian":
        return drawing.jacobian(data, title, names)
    return drawing.hessian(data, title, names)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """numpy -> JSON lists; non-finite values (JSON has none) become null."""
    out = {}
    for k, v in data.items():
        a = np.asarray(v, np.float64)
        out[k] = np.where(np.isfinite(a), a, None).tolist() if a.ndim else float(a)
    return out


# Registered last, so that only paths no route above matches reach it.
@router.get("/models/{rest:path}", response_class=HTMLResponse)
@html_errors
async def not_a_page(request: Request, rest: str) -> Response:
    raise ModelNotFound(f"no page at /models/{rest}; the list of models is at /", code="not_found")
