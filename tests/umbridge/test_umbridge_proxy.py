"""umbridge's reference server (umbridge.serve_models, error_checks on) in front of gradserve
accepts every answer: its checks of output counts and lengths are the judge of ours. Each
answer through the proxy equals gradserve's own and local JAX."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import umbridge
from umbridge_util import REAL_MODELS, Local, tolerance

from helpers import free_port

PROXIED = (*REAL_MODELS, "cholesky_loss", "complex_linear", "scaled_counts")


@pytest.fixture(scope="module")
def proxy(umbridge_server, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    script = Path(__file__).with_name("umbridge_proxy.py")
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), umbridge_server.url, str(port), *PROXIED],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/Info", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_the_proxy_binds_loopback_only(proxy):
    assert _listening_addresses(int(proxy.rsplit(":", 1)[1])) == {"127.0.0.1"}


@pytest.mark.parametrize("name", REAL_MODELS)
def test_the_reference_server_accepts_every_answer(proxy, umbridge_server, name):
    through, direct, local = (
        umbridge.HTTPModel(proxy, name),
        umbridge.HTTPModel(umbridge_server.url, name),
        Local(name),
    )
    assert through.get_output_sizes() == direct.get_output_sizes() == local.output_sizes
    rng = np.random.default_rng(7)
    inputs = [rng.normal(size=n).tolist() for n in local.input_sizes]
    close = tolerance(local)
    assert through(inputs) == direct(inputs)
    n_out, n_in = len(local.output_sizes), len(local.input_sizes)
    for out_wrt, in_wrt in itertools.product(range(n_out), range(n_in)):
        sens = rng.normal(size=local.output_sizes[out_wrt]).tolist()
        vec = rng.normal(size=local.input_sizes[in_wrt]).tolist()
        got = through.gradient(out_wrt, in_wrt, inputs, sens)
        assert got == direct.gradient(out_wrt, in_wrt, inputs, sens)
        np.testing.assert_allclose(got, local.gradient(out_wrt, in_wrt, inputs, sens), **close)
        got = through.apply_jacobian(out_wrt, in_wrt, inputs, vec)
        assert got == direct.apply_jacobian(out_wrt, in_wrt, inputs, vec)
    for out_wrt, in1, in2 in itertools.product(range(n_out), range(n_in), range(n_in)):
        sens = rng.normal(size=local.output_sizes[out_wrt]).tolist()
        vec = rng.normal(size=local.input_sizes[in2]).tolist()
        got = through.apply_hessian(out_wrt, in1, in2, inputs, sens, vec)
        assert got == direct.apply_hessian(out_wrt, in1, in2, inputs, sens, vec)
        np.testing.assert_allclose(
            got, local.apply_hessian(out_wrt, in1, in2, inputs, sens, vec), **close
        )


def test_config_and_evaluate_only_models_pass_the_proxy(proxy, umbridge_server):
    banana = umbridge.HTTPModel(proxy, "banana")
    config = {"a": 1.2, "scale": 0.5}
    assert banana([[0.3, 0.1]], config) == umbridge.HTTPModel(umbridge_server.url, "banana")(
        [[0.3, 0.1]], config
    )
    for name, inputs in [
        ("cholesky_loss", [np.eye(3, dtype=np.complex128).view(np.float64).ravel().tolist()]),
        ("complex_linear", [[1.0, 2.0, 3.0, 4.0], [0.5, -0.5]]),
        ("scaled_counts", [[1, 2, 3], [0.25]]),
    ]:
        through = umbridge.HTTPModel(proxy, name)
        assert not through.supports_gradient()
        assert through(inputs) == umbridge.HTTPModel(umbridge_server.url, name)(inputs)
