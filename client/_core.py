"""The client's core, without I/O: requests from transform chains, answers back to numpy trees.

Every remote operation is a *flow*: a generator that yields `HTTPRequest`s (and `Sleep`s
between retries), receives `HTTPResponse`s, and returns the result. `Client` and `AsyncClient`
drive the same flows, one with blocking sends and one with awaited ones, so the whole protocol,
retry policy and error mapping live here once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from client import _chains, _trees, wire
from client.errors import APIError, ConnectError, InvalidInput, ServerBusy, error_class
from client.specs import SpecTree, check_args, spec_from_json

# Request bodies (and expected answers) at least this big go as npz. Measured with
# bench/client_overhead.py: below it JSON's smaller framing wins, above it npz's raw bytes win.
NPZ_THRESHOLD = 24 * 1024
# "base64": JSON bodies whose array leaves are base64 (both ways), for JSON-only stacks.
ENCODINGS = ("auto", "json", "base64", "npz")
RETRY_STATUSES = (429, 503)
# Exchanges with an npz body at least this big either way are flagged `bulk`: the client sends
# them over its `http.client` path when it owns its HTTP (client/_bulk.py). bench/client_http.py
# measures it faster than httpx at every npz size (32 KiB: 2.8-3.4 ms vs 3.7-4.2); below, the
# bodies are JSON and stay on httpx, whose latency on tiny requests is what it is tuned for.
BULK_THRESHOLD = NPZ_THRESHOLD


@dataclass(frozen=True)
class HTTPRequest:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    # An npz request is the list of buffers `wire.dump_npz_parts` made (joined only if httpx
    # sends it); other bodies are bytes.
    content: bytes | list[bytes | memoryview] | None = None
    timeout: float | None = None
    bulk: bool = False  # a large npz body either way: the bulk path may carry it

    def body(self) -> bytes | None:
        """The body as one bytes (for httpx)."""
        if isinstance(self.content, list):
            return b"".join(self.content)
        return self.content


@dataclass(frozen=True)
class HTTPResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names
    # From the bulk path: a bytearray, or a memoryview for a 200 npz answer (read in place).
    content: bytes | bytearray | memoryview


@dataclass(frozen=True)
class Sleep:
    seconds: float


Flow = Generator[Any, Any, Any]


@dataclass(frozen=True)
class Transform:
    """One function transform of a chain, as sent in `transforms` (options hashable)."""

    op: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, op: str, **options: Any) -> Transform:
        return cls(op, tuple((k, _freeze(v)) for k, v in options.items()))

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, **{k: _thaw(v) for k, v in self.options}}


class _FrozenDict(tuple):
    """A dict option (a vmap axis per key), hashable so chains can key caches and JAX params."""


def _freeze(v: Any) -> Any:
    if isinstance(v, Mapping):
        return _FrozenDict(sorted((k, _freeze(x)) for k, x in v.items()))
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thaw(v: Any) -> Any:
    if isinstance(v, _FrozenDict):
        return {k: _thaw(x) for k, x in v}
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


@dataclass(frozen=True)
class ModelInfo:
    """What `GET /v1/models/{name}` says: `inputs` is one spec tree per positional argument."""

    name: str
    version: str = ""
    description: str = ""
    device: str = ""
    inputs: list[SpecTree] | None = None
    output: SpecTree = None
    ops: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelInfo:
        inputs = doc.get("inputs")
        return cls(
            name=doc["name"],
            version=str(doc.get("version", "")),
            description=doc.get("description", ""),
            device=doc.get("device", ""),
            inputs=None if inputs is None else [spec_from_json(s) for s in inputs],
            output=spec_from_json(doc.get("output")),
            ops=tuple(doc.get("ops", ())),
        )


# The response fields of each named op, rebuilt into what the JAX function returns.
def _assemble(op: str, fields: Mapping[str, Any], has_aux: bool) -> Any:
    if op in ("eval", "call"):
        return fields["value"]
    if op == "grad":
        return (fields["grad"], fields.get("aux")) if has_aux else fields["grad"]
    if op == "value_and_grad":
        value = (fields["value"], fields.get("aux")) if has_aux else fields["value"]
        return (value, fields["grad"])
    if op in ("jacfwd", "jacrev", "jacobian"):
        return (fields["jacobian"], fields.get("aux")) if has_aux else fields["jacobian"]
    if op == "hessian":
        return fields["hessian"]
    if op == "jvp":
        return (fields["value"], fields["tangent"])
    if op == "vjp":
        return (fields["value"], fields["cotangents"])
    return fields["hvp"]


class Core:
    """Settings and caches of one client; builds every flow."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.1,
        encoding: str = "auto",
        npz_threshold: int = NPZ_THRESHOLD,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.encoding, self.npz_threshold = encoding, npz_threshold
        self.bulk_threshold = BULK_THRESHOLD
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.infos: dict[str, ModelInfo] = {}

    def url(self, path: str) -> str:
        return self.base_url + path

    # -- transport policy --------------------------------------------------------------

    def exchange(self, request: HTTPRequest) -> Flow:
        """Send with retries: connection errors, 429 (after its Retry-After) and 503, backing
        off exponentially, never past `timeout`. Any other error status raises at once."""
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                response = yield _with_timeout(request, max(remaining, 0.001))
            except ConnectError as e:
                failure: Exception = e
            else:
                if response.status < 400:
                    return response
                failure = self.error(response)
                if response.status not in RETRY_STATUSES:
                    raise failure
            attempt += 1
            delay = self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            if isinstance(failure, ServerBusy) and failure.retry_after is not None:
                delay = failure.retry_after
            if attempt > self.retries or time.monotonic() + delay >= deadline:
                raise failure
            yield Sleep(delay)

    def error(self, response: HTTPResponse) -> APIError:
        """problem+json -> the matching exception, carrying the server's detail."""
        body: Any = {}
        if "json" in response.headers.get("content-type", ""):
            try:
                body = wire.loads(response.content)
            except InvalidInput:
                body = {}
        if not isinstance(body, Mapping):
            body = {}
        detail = body.get("detail") or response.content[:500].decode("utf-8", "replace")
        return error_class(response.status)(
            detail or f"HTTP {response.status}",
            code=body.get("code"),
            status=response.status,
            request_id=body.get("request_id") or response.headers.get("x-request-id"),
            errors=body.get("errors"),
            headers=dict(response.headers),
        )

    def get_json(self, path: str) -> Flow:
        response = yield from self.exchange(
            HTTPRequest("GET", path, {**self.headers, "Accept": wire.JSON})
        )
        return wire.loads(response.content)

    # -- discovery ---------------------------------------------------------------------

    def models(self) -> Flow:
        doc = yield from self.get_json("/v1/models")
        return [ModelInfo.from_json(m) for m in doc["models"]]

    def info(self, name: str) -> Flow:
        if name not in self.infos:
            doc = yield from self.get_json(f"/v1/models/{name}")
            self.infos[name] = ModelInfo.from_json(doc)
        return self.infos[name]

    # -- computing ---------------------------------------------------------------------

    def compute(
        self,
        model: str,
        chain: tuple[Transform, ...],
        apply: str = "eval",
        args: Sequence[Any] = (),
        extra: Any = None,
        **options: Any,
    ) -> Flow:
        """One request: `apply` (eval, jvp, vjp, hvp) of the chain-transformed model."""
        info = yield from self.info(model)
        args = self.prepare_args(info, chain, args)
        if apply in ("jvp", "hvp"):
            extra = tuple(
                _trees.prepare(t, s) for t, s in zip(extra, _trees.dtype_specs(args), strict=True)
            )
        elif apply == "vjp":
            extra = _trees.prepare(extra)
        op, fields = _route(chain, apply)
        fields.update(options)
        answer = yield from self.post(model, op, args, extra, fields, self._guess_out(op, args))
        last = chain[-1].opts if chain and apply == "eval" else {}
        raw = _assemble(op, answer, bool(last.get("has_aux")))
        return _trees.restore(raw, self.template(info, chain, apply, args, options))

    def prepare_args(self, info: ModelInfo, chain: tuple[Transform, ...], args: Sequence) -> tuple:
        specs = _chains.outer_specs(info.inputs, chain)
        if specs is not None and len(specs) != len(args):
            if not _has_products(chain):
                check_args(info.name, specs, args)  # raises the server's arity message
            specs = None  # a chain jvp/vjp of the wrong arity: the server words it
        args = tuple(
            _trees.prepare(a, specs[i] if specs is not None else None) for i, a in enumerate(args)
        )
        if info.inputs is not None:
            views = _chains.model_view(args, chain)
            if views is not None and (len(views) == len(info.inputs) or not _has_products(chain)):
                check_args(info.name, info.inputs, views)
        return args

    def template(
        self,
        info: ModelInfo,
        chain: tuple[Transform, ...],
        apply: str,
        args: tuple,
        options: Mapping[str, Any] | None = None,
    ) -> Any:
        """The structure JAX gives for this call (see `client._trees`)."""
        args_t = [_trees.template_of(a) for a in args]
        out = _trees.spec_template(info.output)
        for t, level in zip(chain, _chains.levels(args_t, chain), strict=False):
            out = _transformed(t, out, level)
        if apply == "jvp":
            return (out, out)
        if apply == "vjp":
            return (out, tuple(args_t))
        if apply == "hvp":
            nums = (options or {}).get("argnums")
            if isinstance(nums, int):
                return args_t[nums]
            return tuple(args_t) if nums is None else tuple(args_t[n] for n in nums)
        return out

    def _guess_out(self, op: str, args: tuple) -> int:
        """A rough size of the answer, to pick its encoding before it exists."""
        size = _trees.nbytes(args)
        if op in ("jacfwd", "jacrev", "jacobian", "hessian"):
            return size * max(size // 4, 1)
        return size

    def post(
        self, model: str, op: str, args: tuple, extra: Any, fields: dict[str, Any], out_guess: int
    ) -> Flow:
        arrays: dict[str, Any] = {"args": list(args)}
        if extra is not None:
            arrays["tangents" if op in ("jvp", "hvp") else "cotangent"] = extra
        response = yield from self.send(f"/v1/models/{model}/{op}", arrays, fields, out_guess)
        return decode(response)

    def send(
        self,
        path: str,
        arrays: dict[str, Any],
        fields: dict[str, Any],
        answer_guess: int,
        headers: Mapping[str, str] | None = None,
    ) -> Flow:
        """POST array fields and plain ones, JSON or npz by size (the `encoding` rule), asking
        for an npz answer when `answer_guess` bytes would pass the threshold; the response."""
        size = _trees.nbytes(arrays)
        encoding = answer = self.encoding
        if encoding == "auto":
            # Below npz, base64 leaves: cheaper than JSON numbers at every size, both ways.
            encoding = "npz" if size >= self.npz_threshold else "base64"
            answer = "npz" if max(size, answer_guess) >= self.npz_threshold else "json"
        bulk = encoding == "npz" and size >= self.bulk_threshold
        bulk = bulk or (answer == "npz" and answer_guess >= self.bulk_threshold)
        content: bytes | list[bytes | memoryview]
        if encoding == "npz":
            content = wire.dump_npz_parts({**wire.npz_ready(arrays), **fields})
            media = wire.NPZ
        else:
            binary = encoding == "base64"
            body = {**wire.encode_tree(arrays, binary), **fields}
            if binary:
                body["binary"] = True
            content, media = wire.dumps(body), wire.JSON
        accept = wire.NPZ if answer == "npz" else wire.JSON
        all_headers = {**self.headers, **(headers or {}), "Content-Type": media, "Accept": accept}
        request = HTTPRequest("POST", path, all_headers, content, bulk=bulk)
        return (yield from self.exchange(request))


def decode(response: HTTPResponse) -> dict[str, Any]:
    """A 200 body (JSON or npz) -> its fields as trees of ndarrays (lists where JSON has them)."""
    media = response.headers.get("content-type", wire.JSON).split(";")[0].strip()
    doc = wire.load_npz(response.content) if media == wire.NPZ else wire.loads(response.content)
    return {k: wire.decode_tree(v) for k, v in doc.items()}


def _route(chain: tuple[Transform, ...], apply: str) -> tuple[str, dict[str, Any]]:
    """Which endpoint computes this, and its fields: a named op when the outermost transform is
    one (clearer metrics and logs), `call` for an outer `vmap`, `eval` for the bare model."""
    if apply != "eval":
        return apply, _chain_field(chain)
    if not chain:
        return "eval", {}
    last = chain[-1]
    if last.op in ("vmap", "jvp", "vjp"):  # no named op is this function transform
        return "call", _chain_field(chain)
    options = last.to_json()
    del options["op"]
    return last.op, {**_chain_field(chain[:-1]), **options}


def _chain_field(chain: tuple[Transform, ...]) -> dict[str, Any]:
    return {"transforms": [t.to_json() for t in chain]} if chain else {}


def _has_products(chain: tuple[Transform, ...]) -> bool:
    return any(t.op in ("jvp", "vjp") for t in chain)


def _transformed(t: Transform, out: Any, args: Sequence[Any]) -> Any:
    """The template of `t(f)`'s output, `f` returning `out` and taking `args`."""
    if t.op not in ("jvp", "vjp"):
        return _trees.transformed(t.op, t.opts, out, args)
    value = t.opts.get("value", True)
    if t.op == "jvp":
        product = out
    else:
        nums = _chains.product_argnums(t, len(args))  # `args` are the primals here
        single = isinstance(t.opts.get("argnums"), int)
        product = args[nums[0]] if single else tuple(args[k] for k in nums)
    return (out, product) if value else product


def _with_timeout(request: HTTPRequest, timeout: float) -> HTTPRequest:
    return replace(request, timeout=timeout)
