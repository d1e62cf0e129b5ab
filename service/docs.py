"""/docs (Swagger UI) and /redoc with their JavaScript and CSS served by this app, not a CDN.

FastAPI's defaults load both from jsDelivr, so the docs are blank wherever the machine cannot
reach it (an air-gapped GPU box, an HPC node). The files come from the `fastapi-offline`
package, which ships Swagger UI's and ReDoc's distributions and refreshes them with each
release; `service.pages` mounts them under /static/docs. FastAPI's own page builders are used
as they are, pointed at those files.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)
ASSETS = "/static/docs"
FAVICON = "/static/favicon.svg"


# The docs pages may load nothing from elsewhere: with no network, a CDN request would only
# fail (ReDoc's sidebar badge asks cdn.redoc.ly for its logo, and hides it when that fails).
# FastAPI's pages start Swagger UI and ReDoc with inline scripts; ReDoc searches in a worker.
_DOCS_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; worker-src 'self' blob:; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title="gradserve · API docs",
        swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{FAVICON}",
        oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        # Swagger UI would send the schema to an online validator for its badge.
        swagger_ui_parameters={"validatorUrl": None},
    )
    page.headers.update(_DOCS_HEADERS)
    return page


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title="gradserve · API reference",
        redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{FAVICON}",
        with_google_fonts=False,
    )
    page.headers.update(_DOCS_HEADERS)
    return page
