"""What the model pages plot around a point, computed as ordinary requests.

Each plot is one request document sent through the shared path (prepare -> engine -> package,
by the `Run` the pages hand in), so limits, deadlines, batching and metrics apply as to any API
call; this module only builds the documents and reads the answers. Host-side arithmetic on the
answers (dot products, eigenvalues) runs on a worker thread, never on the event loop. Drawing
is `service.drawing`'s.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jax
import numpy as np
from starlette.concurrency import run_in_threadpool

from client.errors import PayloadTooLarge
from client.specs import ArraySpec
from service.plot_query import PlotParams, bad, not_applicable
from service.registry import Model

KINDS = ("direction", "contour", "jacobian", "hessian")
# Bounds on what a plot may cost.
MAX_BATCH_ELEMENTS = 2**20  # samples x input elements in the direction plot's one request
MAX_HESSIAN = 256  # input elements for the Hessian heat map ("a few hundred")
MAX_JACOBIAN = 2**18  # Jacobian entries to draw

Run = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


# ---------------------------------------------------------------------------- the point


def default_point(model: Model) -> list | None:
    """The model's declared `example`, else a point built from its input specs (None: neither)."""
    example = getattr(model.spec, "example", None)
    if example is not None:
        return _jsonable(example)
    if model.spec.inputs is None:
        return None
    return [_from_spec(spec) for spec in model.spec.inputs]


def _jsonable(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    return np.asarray(tree).tolist()


def _from_spec(spec: Any) -> Any:
    if isinstance(spec, ArraySpec):
        shape = (3,) if spec.shape is None else tuple(2 if d is None else d for d in spec.shape)
        size = math.prod(shape)
        if spec.dtype is not None and not spec.dtype.startswith(("float", "bfloat", "complex")):
            return np.zeros(shape, int).tolist()
        return (
            (np.linspace(-0.75, 0.75, size) if size > 1 else np.full(1, 0.5))
            .reshape(shape)
            .round(4)
            .tolist()
        )
    if isinstance(spec, Mapping):
        return {k: _from_spec(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [_from_spec(v) for v in spec]
    return 0.5


def _is_real_float(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"


class Point:
    """A model's arguments, and the real floating-point ones as one flat vector: the variables
    the plots move along (other arguments, such as integer labels, stay as given)."""

    def __init__(self, args: tuple) -> None:
        self.args = args
        flat = [jax.tree.flatten(a) for a in args]
        self._flat = flat
        # Whole arguments only: argnums cannot pick the float leaves out of a mixed argument.
        self.free = tuple(
            i for i, (leaves, _) in enumerate(flat) if leaves and all(map(_is_real_float, leaves))
        )
        self.leaves = [leaf for i in self.free for leaf in flat[i][0]]
        self.n = sum(x.size for x in self.leaves)
        self.vector = (
            np.concatenate([x.astype(np.float64).ravel() for x in self.leaves])
            if self.leaves
            else np.zeros(0)
        )
        digest = hashlib.sha256(repr([treedef for _, treedef in flat]).encode())
        for x in jax.tree.leaves(args):
            digest.update(f"{x.dtype.str}{x.shape}".encode())
            digest.update(np.ascontiguousarray(x).tobytes())
        self.key = digest.hexdigest()

    def batch(self, vectors: np.ndarray) -> list:
        """Arguments for each row of `vectors` (N, n), stacked on a new leading axis."""
        count, args, at = len(vectors), [], 0
        for i, (leaves, treedef) in enumerate(self._flat):
            batched = []
            for x in leaves:
                if i in self.free:
                    column = vectors[:, at : at + x.size].reshape(count, *x.shape)
                    batched.append(column.astype(x.dtype))
                    at += x.size
                else:
                    batched.append(np.broadcast_to(x, (count, *x.shape)).copy())
            args.append(jax.tree.unflatten(treedef, batched))
        return args

    def tangents(self, v: np.ndarray, count: int) -> list:
        """`v` as tangents for `count` stacked arguments (zero for the arguments held fixed)."""
        batched = self.batch(np.broadcast_to(v, (count, self.n)))
        return [
            arg if i in self.free else jax.tree.map(np.zeros_like, arg)
            for i, arg in enumerate(batched)
        ]

    def as_sent(self, v: np.ndarray) -> np.ndarray:
        """`v` rounded to each variable's dtype, as a request carries it (in float64)."""
        parts, at = [], 0
        for x in self.leaves:
            parts.append(v[at : at + x.size].astype(x.dtype).astype(np.float64))
            at += x.size
        return np.concatenate(parts) if parts else np.zeros(0)

    def names(self, model: Model) -> list[tuple[str, int]]:
        """(label, size) of each variable leaf, named after the model function's parameters."""
        params = parameter_names(model)
        out = []
        for i in self.free:
            base = params[i] if i < len(params) else f"arg{i}"
            paths, _ = jax.tree_util.tree_flatten_with_path(self.args[i])
            for path, x in paths:
                out.append((base + jax.tree_util.keystr(path), int(x.size)))
        return out


def parameter_names(model: Model) -> list[str]:
    """The model function's argument names (after the server-held parameters), if it has any."""
    try:
        names = list(inspect.signature(model.spec.fn).parameters)
    except (TypeError, ValueError):
        return []
    return names[1:] if model.has_params else names


def unit_direction(point: Point, given: tuple[float, ...] | None) -> np.ndarray:
    """The given direction (normalised), else a fixed pseudo-random unit vector."""
    if given is None:
        v = np.random.default_rng(0).standard_normal(point.n)
    elif len(given) != point.n:
        raise bad("direction", f"has {len(given)} numbers; the point has {point.n} variables")
    else:
        v = np.asarray(given, np.float64)
    norm = float(np.linalg.norm(v))
    if norm == 0:
        raise bad("direction", "must not be zero")
    return v / norm


def check(point: Point, params: PlotParams) -> np.ndarray:
    """What depends on the point: the direction's length, the size of the batch. The unit v."""
    if params.samples * point.n > MAX_BATCH_ELEMENTS:
        raise bad("samples", f"{params.samples} samples of {point.n} variables is too many")
    return unit_direction(point, params.direction)


# ---------------------------------------------------------------------------- plots


def _value_and_grad_chain(point: Point) -> list[dict[str, Any]]:
    return [{"op": "value_and_grad", "argnums": list(point.free)}, {"op": "vmap"}]


async def direction(point: Point, params: PlotParams, run: Run) -> dict[str, Any]:
    """f(x + t v), d/dt and d2/dt2 at `samples` values of t: one request, the JVP of a vmapped
    value_and_grad (forward over reverse), so d/dt and Hv come from the server."""
    v = check(point, params)
    ts = np.linspace(-params.span, params.span, params.samples)
    v_sent = point.as_sent(v)
    doc = {
        "args": point.batch(point.vector + ts[:, None] * v),
        "tangents": point.tangents(v, len(ts)),
        "transforms": _value_and_grad_chain(point),
    }
    fields = await run("jvp", doc)

    def finish() -> dict[str, Any]:
        (values, _), (slopes, hvps) = fields["value"], fields["tangent"]
        hv = np.concatenate(
            [np.asarray(h, np.float64).reshape(len(ts), -1) for h in jax.tree.leaves(hvps)], 1
        )
        return {
            "t": ts,
            "f": np.asarray(values),
            "df": np.asarray(slopes),
            "d2f": hv @ v_sent,
            "variables": point.vector,
            "direction": v_sent,
        }

    return await run_in_threadpool(finish)


async def contour(point: Point, params: PlotParams, run: Run) -> dict[str, Any]:
    """f and its gradient on a grid over a box around a 2-variable point: one vmapped request."""
    if point.n != 2:
        raise not_applicable(f"a contour map needs 2 input variables; this point has {point.n}")
    x0, y0 = point.vector
    s = params.span
    box = params.box or (x0 - s, x0 + s, y0 - s, y0 + s)
    xs, ys = np.linspace(box[0], box[1], params.grid), np.linspace(box[2], box[3], params.grid)
    grid = np.stack([g.ravel() for g in np.meshgrid(xs, ys)], axis=1)
    fields = await run(
        "call", {"args": point.batch(grid), "transforms": _value_and_grad_chain(point)}
    )
    values, grads = fields["value"]
    g = np.concatenate([np.reshape(x, (len(grid), -1)) for x in jax.tree.leaves(grads)], 1)
    shape = (params.grid, params.grid)
    return {
        "x": xs,
        "y": ys,
        "f": np.reshape(values, shape),
        "grad_x": g[:, 0].reshape(shape),
        "grad_y": g[:, 1].reshape(shape),
        "variables": point.vector,
    }


async def jacobian(point: Point, params: PlotParams, run: Run) -> dict[str, Any]:
    """The Jacobian at the point, one row per output element, one column per input variable."""
    fields = await run("jacobian", {"args": list(point.args), "argnums": list(point.free)})
    blocks = jax.tree.leaves(fields["jacobian"])
    rows = int(np.prod(np.shape(blocks[0])[: np.ndim(blocks[0]) - point.leaves[0].ndim]))
    if rows * point.n > MAX_JACOBIAN:
        raise PayloadTooLarge(
            f"the Jacobian has {rows} x {point.n} entries; the pages draw at most {MAX_JACOBIAN}",
            code="plot_too_large",
        )
    return {"jacobian": np.concatenate([np.reshape(b, (rows, -1)) for b in blocks], 1)}


async def hessian(point: Point, params: PlotParams, run: Run) -> dict[str, Any]:
    """The Hessian at the point and its eigenvalues (of its symmetric part, on the host)."""
    if point.n > MAX_HESSIAN:
        raise not_applicable(
            f"the Hessian is drawn for at most {MAX_HESSIAN} input variables; this point has "
            f"{point.n}"
        )
    fields = await run("hessian", {"args": list(point.args), "argnums": list(point.free)})

    def finish() -> dict[str, Any]:
        # Leaves come row-major over the variables: for each leaf i, for each leaf j, H_ij.
        blocks = iter(jax.tree.leaves(fields["hessian"]))
        h = np.block(
            [
                [np.reshape(next(blocks), (a.size, b.size)) for b in point.leaves]
                for a in point.leaves
            ]
        )
        sym = (h.astype(np.float64) + h.T) / 2
        return {"hessian": h, "eigenvalues": np.linalg.eigvalsh(sym)}

    return await run_in_threadpool(finish)


COMPUTE = {"direction": direction, "contour": contour, "jacobian": jacobian, "hessian": hessian}


def applicable(point: Point, value: Any) -> tuple[list[str], str | None]:
    """The plots that fit a model's output at the point, or why none do."""
    if not isinstance(value, np.ndarray) and not hasattr(value, "dtype"):
        return [], "plots are drawn for models returning one array"
    if not _is_real_float(np.asarray(value)):
        return [], f"plots are drawn for real floating-point outputs, not {value.dtype}"
    if point.n == 0:
        return [], "plots need at least one real floating-point argument"
    if np.ndim(value) == 0:
        kinds = (
            ["direction"] + ["contour"] * (point.n == 2) + ["hessian"] * (point.n <= MAX_HESSIAN)
        )
        return kinds, None
    if np.size(value) * point.n > MAX_JACOBIAN:
        return [], f"its {np.size(value)} x {point.n} Jacobian is too large to draw"
    return ["jacobian"], None


# ---------------------------------------------------------------------------- cache


class PlotCache:
    """Answers per (model, point, plot, parameters), least recently used dropped first.

    Concurrent requests for one key share one computation; failures are not kept.
    """

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._done: OrderedDict[tuple, Any] = OrderedDict()
        self._pending: dict[tuple, asyncio.Future] = {}

    async def get(self, key: tuple, make: Callable[[], Awaitable[Any]]) -> Any:
        if key in self._done:
            self._done.move_to_end(key)
            return self._done[key]
        if key in self._pending:
            return await asyncio.shield(self._pending[key])
        future = self._pending[key] = asyncio.get_running_loop().create_future()
        try:
            value = await make()
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        else:
            future.set_result(value)
            self._done[key] = value
            if len(self._done) > self.size:
                self._done.popitem(last=False)
            return value
        finally:
            del self._pending[key]
