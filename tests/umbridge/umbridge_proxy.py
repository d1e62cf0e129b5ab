"""umbridge's own reference server in front of gradserve, as a validating proxy.

    python tests/umbridge/umbridge_proxy.py GRADSERVE_URL PORT MODEL [MODEL ...]

`umbridge.serve_models` checks every answer's shapes against the sizes the models declare
(`error_checks=True`, its default) before passing it on. It binds every interface through
aiohttp's `run_app`; here it gets 127.0.0.1 only.
"""

from __future__ import annotations

import functools
import sys

import umbridge
from aiohttp import web

if __name__ == "__main__":
    url, port, *names = sys.argv[1:]
    web.run_app = functools.partial(web.run_app, host="127.0.0.1", print=None)
    umbridge.serve_models([umbridge.HTTPModel(url, name) for name in names], int(port))
