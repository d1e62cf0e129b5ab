"""`pip install .` in a clean venv (no JAX, no FastAPI) gives a working client.

Builds the distribution from a copy of the sources into a fresh venv (no system site-packages)
and runs the client there against a live server. About 20 s: pip resolves httpx and numpy from
its configured index or cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib.util, json, sys
from client import Client, grad, vmap, vjp, errors
from client import GradserveError, InvalidInput, ModelNotFound
import gradserve as gs
assert importlib.util.find_spec("jax") is None and importlib.util.find_spec("fastapi") is None
assert gs.Client is Client and gs.AsyncClient and gs.grad is grad and gs.hessian and gs.hvp
assert gs.InvalidInput is InvalidInput is errors.InvalidInput and gs.errors is errors
assert issubclass(ModelNotFound, GradserveError) and gs.ServerBusy is errors.ServerBusy
assert not {"jax", "fastapi", "service"} & set(sys.modules), sorted(sys.modules)
try:
    import client.jax
except ImportError as e:
    jax_error = str(e)
else:
    raise SystemExit("client.jax imported without jax")
import numpy as np
with Client(sys.argv[1]) as c:
    tanh, f = c.model("tanh"), c.model("logistic_predict")
    third = grad(grad(grad(tanh)))(2.0)
    per_x = vmap(grad(tanh))(np.linspace(-1, 1, 5))
    y, pullback = vjp(f, np.ones(3), 0.5)
    W_bar, b_bar = pullback(np.ones(4))
    try:
        c.model("nope")
    except ModelNotFound as e:
        missing = str(e)
    try:
        gs.grad(f)(np.ones(3), 0.5)
    except GradserveError as e:
        refused = e.code
with gs.Client(sys.argv[1]) as c:
    H = gs.hessian(c.model("logistic_predict"))(np.ones(3), 0.5)
print(json.dumps({"third": float(third), "per_x": per_x.tolist(), "W_bar": W_bar.tolist(),
                  "b_bar": float(b_bar), "missing": missing, "jax_error": jax_error,
                  "refused": refused, "H": H.tolist()}))
"""


def test_pip_install_gives_a_client_without_jax(tmp_path: Path, client_server: Any) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    (src / "README.md").write_text((ROOT / "README.md").read_text())
    for package in ("client", "service", "gradserve"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = tmp_path / "env"
    venv.create(env, with_pip=True)  # clean: no system site-packages
    python = env / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    out = subprocess.run(
        [python, "-c", SCRIPT, client_server.url],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # so `client` comes from the installed distribution, not this checkout
    )
    got = json.loads(out.stdout)
    np.testing.assert_allclose(got["third"], jax.grad(jax.grad(jax.grad(jnp.tanh)))(2.0), rtol=1e-6)
    xs = np.linspace(-1, 1, 5, dtype=np.float32)
    np.testing.assert_allclose(got["per_x"], jax.vmap(jax.grad(jnp.tanh))(xs), rtol=1e-6)
    from service.models import cookbook as cb

    _, pullback = jax.vjp(cb.logistic_predict, jnp.ones(3), jnp.float32(0.5))
    W_bar, b_bar = pullback(jnp.ones(4))
    np.testing.assert_allclose(got["W_bar"], W_bar, rtol=1e-6)
    np.testing.assert_allclose(got["b_bar"], b_bar, rtol=1e-6)
    assert "no model named 'nope'" in got["missing"]
    assert got["refused"] == "non_scalar_output"
    H = jax.hessian(cb.logistic_predict)(jnp.ones(3), jnp.float32(0.5))
    np.testing.assert_allclose(got["H"], H, rtol=1e-6)
