"""The engine's behaviour (not its speed): batching, caches, backpressure, deadlines, devices."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

from client import wire
from helpers import LiveServer, assert_tree_equal, decode
from service import Settings, create_app
from service.engine.compiler import CacheKey, CompileCache
from service.metrics import Metrics
from service.models import cookbook as cb

ENGINE_MODELS = str(Path(__file__).with_name("engine_models.py"))


def timing(response: httpx.Response, name: str) -> str:
    match = re.search(
        rf'{name};(?:dur=([0-9.]+)|desc="([^"]*)")', response.headers["server-timing"]
    )
    assert match, response.headers["server-timing"]
    return match.group(1) or match.group(2)


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


class AsyncApp:
    """The app in-process with its lifespan, for truly concurrent requests from one loop."""

    def __init__(self, **settings) -> None:
        self.app = create_app(Settings(**settings))

    async def __aenter__(self) -> httpx.AsyncClient:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://gradserve")
        for _ in range(600):
            if (await self.client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        return self.client

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()
        await self._lifespan.__aexit__(*exc)


async def test_concurrent_requests_batch_and_equal_unbatched():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((32, 1, 784)).astype(np.float32)
    ys = rng.integers(0, 10, (32, 1)).astype(np.int32)
    params = cb.mlp_init(jax.random.PRNGKey(0))
    single = jax.jit(jax.grad(cb.mlp_loss, argnums=1))

    async with AsyncApp(max_batch_delay_ms=20) as client:

        async def one(i: int) -> httpx.Response:
            body = wire.dump_npz({"args": [xs[i], ys[i]]})
            return await client.post(
                "/v1/models/mlp_loss/grad", content=body, headers={"content-type": wire.NPZ}
            )

        await one(0)  # compile the unbatched program first
        # A batch size seen for the first time runs one by one while its stacked program
        # compiles on the side; later bursts of that size run stacked.
        for _ in range(20):
            responses = await asyncio.gather(*(one(i) for i in range(32)))
            sizes = [int(timing(r, "batch")) for r in responses]
            if max(sizes) > 1:
                break
            await asyncio.sleep(0.5)
    assert max(sizes) > 1, sizes
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        assert_tree_equal(decode(r)["grad"], single(params, xs[i], ys[i]), rtol=1e-5, atol=1e-6)


async def test_batching_off_with_max_batch_size_1():
    async with AsyncApp(max_batch_size=1) as client:
        bodies = [{"args": [float(x)]} for x in np.linspace(0, 1, 8)]
        rs = await asyncio.gather(*(client.post("/v1/models/tanh/grad", json=b) for b in bodies))
    assert {timing(r, "batch") for r in rs} == {"1"}


def test_compile_cache_lru_and_shape_cap():
    metrics = Metrics()
    cache = CompileCache(max_entries=4, max_shapes=2, metrics=metrics)
    for n in range(5):
        for program in ("grad", "eval"):
            cache.put(CacheKey("m", "1", program, 0, ((n,),)), object())
        assert cache.shapes("m") <= 2 and len(cache) <= 4
    assert cache.get(CacheKey("m", "1", "grad", 0, ((4,),))) is not None
    assert cache.get(CacheKey("m", "1", "grad", 0, ((0,),))) is None  # evicted with its shape
    for n in range(10):
        cache.put(CacheKey(f"other{n}", "1", "eval", 0, ((1,),)), object())
    assert len(cache) == 4
    text = metrics.render().decode()
    assert metric(text, 'gradserve_compile_cache_total{result="eviction"}') >= 6


def test_served_cache_holds_its_bounds(app_factory):
    with app_factory(
        compile_cache_size=3, max_shapes_per_model=2, max_shapes_per_minute=1000
    ) as client:
        for n in range(1, 7):
            r = client.post("/v1/models/tanh_sq_sum/grad", json={"args": [[0.5] * n]})
            assert r.status_code == 200, r.text
        engine = client.app.state.gradserve.engine
        assert len(engine.cache) <= 3 and engine.cache.shapes("tanh_sq_sum") <= 2
        assert (
            metric(client.get("/metrics").text, 'gradserve_compile_cache_total{result="eviction"}')
            >= 3
        )


def test_full_queue_is_429_with_retry_after(app_factory):
    with app_factory(models=[ENGINE_MODELS], max_queue=1, workers_per_device=1) as client:
        results: list[httpx.Response] = []

        def slow_call() -> None:
            results.append(client.post("/v1/models/slow/eval", json={"args": [1.0, 1.0]}))

        threads = [threading.Thread(target=slow_call) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.2)  # the first runs, the second waits in the queue
        r = client.post("/v1/models/tanh/eval", json={"args": [1.0]})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1" and r.json()["code"] == "queue_full"
        for t in threads:
            t.join()
        assert [x.status_code for x in results] == [200, 200]
        assert client.post("/v1/models/tanh/eval", json={"args": [1.0]}).status_code == 200


def test_deadline_is_504_and_unstarted_work_is_dropped(app_factory):
    import sys

    # No replacement worker: the second request stays queued behind the first until dropped.
    with app_factory(
        models=[ENGINE_MODELS], request_timeout_s=0.5, workers_per_device=1, max_overdue_workers=0
    ) as client:
        runs = sys.modules["gradserve_models_engine_models"].RUNS
        client.post("/v1/models/slow/eval", json={"args": [1.0, 0.0]})  # compile
        before = runs["slow"]
        results: list[httpx.Response] = []

        def call(seconds: float) -> None:
            results.append(client.post("/v1/models/slow/eval", json={"args": [1.0, seconds]}))

        threads = [
            threading.Thread(target=call, args=(1.0,)),
            threading.Thread(target=call, args=(0.0,)),
        ]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [504, 504]
        assert results[0].json()["code"] == "deadline_exceeded"
        time.sleep(1.0)  # the first finishes in the background; the second never starts
        assert runs["slow"] - before == 1
        r = client.post("/v1/models/tanh/eval", json={"args": [1.0]})
        assert r.status_code == 200


def test_a_refusal_is_remembered_not_traced_again(app_factory):
    import sys

    with app_factory(models=[ENGINE_MODELS]) as client:
        traces = sys.modules["gradserve_models_engine_models"].TRACES
        refusals = []
        for _ in range(3):
            r = client.post("/v1/models/vector_out/grad", json={"args": [[1.0, 2.0]]})
            refusals.append((r.status_code, r.json()["code"], r.json()["detail"]))
            if len(refusals) == 1:
                traced = traces["vector_out"]
        assert refusals[0][:2] == (422, "non_scalar_output") and len(set(refusals)) == 1
        assert traces["vector_out"] == traced  # the same request again costs no trace
        r = client.post("/v1/models/vector_out/grad", json={"args": [[1.0, 2.0, 3.0]]})
        assert r.status_code == 422 and traces["vector_out"] > traced  # a new shape is traced
        r = client.post("/v1/models/vector_out/eval", json={"args": [[1.0, 2.0]]})
        assert r.status_code == 200
        x = np.array([1.0, 2.0], np.float32)
        assert_tree_equal(decode(r)["value"], jax.jit(lambda x: 2 * x)(x))


def test_healthz_answers_while_every_worker_is_busy(app_factory):
    with app_factory(models=[ENGINE_MODELS], workers_per_device=1) as client:
        done = threading.Event()

        def busy() -> None:
            client.post("/v1/models/slow/eval", json={"args": [1.0, 1.5]})
            done.set()

        threading.Thread(target=busy).start()
        time.sleep(0.3)
        assert client.get("/healthz").json() == {"status": "ok"}
        assert not done.is_set()  # answered while the computation was still running
        done.wait(5)


def test_gpu_preference_falls_back_to_cpu(app_factory, caplog):
    with (
        caplog.at_level("WARNING", logger="gradserve"),
        app_factory(models=[ENGINE_MODELS]) as client,
    ):
        r = client.post("/v1/models/wants_gpu/eval", json={"args": [2.0]})
        assert r.status_code == 200 and timing(r, "device").startswith("cpu")
    assert any("prefers gpu" in m for m in caplog.messages)


def test_warm_up_makes_readyz_wait_then_needs_no_compile(app_factory):
    with app_factory(warmup=True) as client:
        assert client.get("/readyz").status_code == 200  # app_factory waited for it
        r = client.post("/v1/models/logistic_loss/grad", json={"args": [[1, 2, 3], 0.5]})
        assert float(timing(r, "compile")) == 0.0


async def test_warmup_batch_size_compiles_the_buckets_before_the_first_burst():
    xs = np.linspace(-1, 1, 8, dtype=np.float32).reshape(8, 1)
    local = jax.jit(jax.grad(lambda x: jax.numpy.sum(jax.numpy.tanh(x) ** 2)))
    compiles = 'gradserve_compiles_total{model="warm_batched"}'
    async with AsyncApp(models=[ENGINE_MODELS], warmup=True, max_batch_delay_ms=50) as client:
        before = metric((await client.get("/metrics")).text, compiles)
        responses = await asyncio.gather(
            *(client.post("/v1/models/warm_batched/grad", json={"args": [x.tolist()]}) for x in xs)
        )
        await asyncio.sleep(1.0)  # a bucket compiled on the side would be counted by now
        after = metric((await client.get("/metrics")).text, compiles)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    # Warm-up compiled eval, grad and value_and_grad, each alone and in buckets 2, 4 and 8;
    # the first burst ran batched and compiled nothing, on its path or on the side.
    assert before == 12 and after == before, (before, after)
    assert max(int(timing(r, "batch")) for r in responses) > 1
    for x, r in zip(xs, responses, strict=True):
        assert_tree_equal(decode(r)["grad"], local(x), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def two_device_server():
    server = LiveServer("--models", ENGINE_MODELS, env={"GRADSERVE_CPU_DEVICES": "2"}).wait_ready()
    yield server
    server.stop()


def test_routing_spreads_over_two_cpu_devices(two_device_server):
    from concurrent.futures import ThreadPoolExecutor

    x = np.linspace(-1, 1, 50_000, dtype=np.float32)
    body = wire.dump_npz({"args": [x]})

    def one(_: int) -> str:
        r = httpx.post(
            f"{two_device_server.url}/v1/models/spread/grad",
            content=body,
            headers={"content-type": wire.NPZ},
            timeout=30,
        )
        assert r.status_code == 200, r.text  # on failure, conftest prints the server's log
        assert_tree_equal(
            decode(r)["grad"],
            jax.grad(lambda v: jax.numpy.sum(jax.numpy.sin(v) ** 2))(x),
            rtol=1e-4,
            atol=1e-6,
        )
        return timing(r, "device")

    with ThreadPoolExecutor(8) as pool:
        devices = set(pool.map(one, range(48)))
    assert devices == {"cpu:0", "cpu:1"}


def test_second_process_reuses_the_persistent_cache(tmp_path):
    env = {"GRADSERVE_COMPILE_CACHE_DIR": str(tmp_path), "GRADSERVE_WARMUP": "true"}
    texts = []
    for _ in range(2):
        server = LiveServer(env=env).wait_ready()
        try:
            texts.append(httpx.get(f"{server.url}/metrics").text)
        finally:
            server.stop()
    first_misses = metric(texts[0], 'gradserve_persistent_cache_total{result="miss"}')
    second_hits = metric(texts[1], 'gradserve_persistent_cache_total{result="hit"}')
    second_misses = metric(texts[1], 'gradserve_persistent_cache_total{result="miss"}')
    assert first_misses > 0 and second_hits >= first_misses and second_misses == 0
