"""JAX's function transforms for remote models: same names, arguments and results as `jax`.

Transforms compose lazily: ``grad(grad(grad(f)))`` only records the chain, and calling it sends
one request that the server computes as one composed JAX function. With an `AsyncClient`, the
calls (and `jvp`, `vjp`, `hvp`, `linearize`) return awaitables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from client import _sessions
from client._core import Transform
from client._remote import RemoteFunction, _Bound

__all__ = [
    "grad",
    "hessian",
    "hvp",
    "jacfwd",
    "jacobian",
    "jacrev",
    "jvp",
    "linearize",
    "value_and_grad",
    "vjp",
    "vmap",
]

HVP_MODES = ("fwd_rev", "rev_fwd", "rev_rev")


def _remote(fun: Any, name: str) -> RemoteFunction:
    if isinstance(fun, RemoteFunction):
        return fun
    if isinstance(fun, _Bound):
        raise TypeError(
            f"{name} of a remote {type(fun).__name__.lower()} is not available; only vmap "
            "applies to it. Differentiate the remote function itself (hessian, hvp)."
        )
    raise TypeError(
        f"client.{name} transforms remote models (client.model(name) and transforms of it); "
        f"got {fun!r}. For a local Python function use jax.{name} instead."
    )


def _argnums(argnums: int | Sequence[int]) -> int | tuple[int, ...]:
    if isinstance(argnums, int):
        return argnums
    return tuple(int(n) for n in argnums)


def _diff(op: str, fun: Any, argnums: Any, **options: Any) -> RemoteFunction:
    return _remote(fun, op).then(Transform.of(op, argnums=_argnums(argnums), **options))


def grad(
    fun: Any, argnums: int | Sequence[int] = 0, has_aux: bool = False, holomorphic: bool = False
) -> RemoteFunction:
    """Gradient of a scalar-valued remote function, computed on the server.

    Args:
      fun: a remote function (``client.model(name)``, or a transform of one) returning a scalar.
      argnums: which positional argument(s) to differentiate with respect to (default 0).
      has_aux: whether ``fun`` returns a pair ``(output, aux)``; aux is returned beside the grad.
      holomorphic: whether ``fun`` is holomorphic (complex inputs and output).

    Returns:
      A remote function with ``fun``'s arguments that returns the gradient, shaped like the
      argument (a tuple of them when ``argnums`` is a tuple). Nothing is sent until it is called.

    >>> grad_tanh = grad(client.model("tanh"))
    >>> grad_tanh(2.0)  # array(0.07065082, dtype=float32)
    """
    return _diff("grad", fun, argnums, has_aux=has_aux, holomorphic=holomorphic)


def value_and_grad(
    fun: Any, argnums: int | Sequence[int] = 0, has_aux: bool = False, holomorphic: bool = False
) -> RemoteFunction:
    """Like `grad`, but the remote function returns ``(value, gradient)`` from one request.

    Args: as for `grad`. With ``has_aux`` the value is the pair ``(output, aux)``.

    >>> loss = client.model("logistic_loss")
    >>> value, (W_grad, b_grad) = value_and_grad(loss, (0, 1))(W, b)
    """
    return _diff("value_and_grad", fun, argnums, has_aux=has_aux, holomorphic=holomorphic)


def jacfwd(
    fun: Any, argnums: int | Sequence[int] = 0, has_aux: bool = False, holomorphic: bool = False
) -> RemoteFunction:
    """Jacobian of a remote function by forward mode (pushing forward the input basis).

    Args: as for `grad`; ``fun`` may return any pytree of arrays.

    Returns:
      A remote function returning the Jacobian: the output's tree, each leaf of shape
      ``output.shape + input.shape``.

    >>> f = client.model("logistic_predict")
    >>> jacfwd(f)(W, b).shape  # (4, 3)
    """
    return _diff("jacfwd", fun, argnums, has_aux=has_aux, holomorphic=holomorphic)


def jacrev(
    fun: Any, argnums: int | Sequence[int] = 0, has_aux: bool = False, holomorphic: bool = False
) -> RemoteFunction:
    """Jacobian of a remote function by reverse mode (pulling back the output basis).

    Args and result: as for `jacfwd`; reverse mode is cheaper when outputs are fewer than inputs.

    >>> f = client.model("logistic_predict")
    >>> jacfwd(jacrev(f))(W, b).shape  # (4, 3, 3), one request
    """
    return _diff("jacrev", fun, argnums, has_aux=has_aux, holomorphic=holomorphic)


def jacobian(
    fun: Any,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    holomorphic: bool = False,
    mode: str = "auto",
) -> RemoteFunction:
    """Jacobian of a remote function; the server picks the mode unless ``mode`` does.

    Args: as for `jacfwd`, plus ``mode``: ``"fwd"``, ``"rev"`` or ``"auto"`` (forward when the
    inputs are fewer than the outputs).

    >>> J = jacobian(client.model("logistic_predict"))(W, b)
    >>> J.shape  # (4, 3)
    """
    if mode not in ("fwd", "rev", "auto"):
        raise ValueError(f"mode must be 'fwd', 'rev' or 'auto', got {mode!r}")
    return _diff("jacobian", fun, argnums, has_aux=has_aux, holomorphic=holomorphic, mode=mode)


def hessian(
    fun: Any, argnums: int | Sequence[int] = 0, holomorphic: bool = False
) -> RemoteFunction:
    """Hessian of a remote function, ``jax.hessian``: ``jacfwd(jacrev(fun))`` in one request.

    Args: as for `grad`; ``fun`` may return any pytree of arrays, not only a scalar.

    Returns:
      A remote function returning the Hessian: for each output leaf, the input tree nested in
      the input tree (a tuple of tuples for tuple ``argnums``), each leaf of shape
      ``output.shape + input.shape + input.shape``.

    >>> H = hessian(client.model("logistic_predict"))(W, b)
    >>> H.shape  # (4, 3, 3)
    """
    return _diff("hessian", fun, argnums, holomorphic=holomorphic)


def vmap(fun: Any, in_axes: Any = 0, out_axes: Any = 0) -> Any:
    """Vectorise a remote function (or a pullback) over a batch axis, in one request.

    Args:
      fun: a remote function, or the pullback of `vjp` / pushforward of `linearize`.
      in_axes: an int, None, or a tuple with one int/None per positional argument.
      out_axes: where the batch axis goes in the output.

    Returns:
      A remote function; over a pullback, one batched request (``batched: true``).

    >>> per_example = vmap(grad(client.model("tanh")))(xs)
    >>> (cotangents,) = vmap(pullback)(U)  # 128 covectors, one request
    """
    if isinstance(fun, _Bound):
        return fun.batched(in_axes, out_axes)
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    return _remote(fun, "vmap").then(Transform.of("vmap", in_axes=in_axes, out_axes=out_axes))


def jvp(fun: Any, primals: Sequence[Any], tangents: Sequence[Any]) -> Any:
    """Jacobian-vector product: push ``tangents`` forward along ``fun`` at ``primals``.

    Args:
      fun: a remote function.
      primals: a tuple or list of its positional arguments.
      tangents: a tuple or list of the same structure (Python scalars take their primal's dtype).

    Returns:
      ``(fun(*primals), tangent_out)``, from one request.

    >>> y, u = jvp(client.model("logistic_predict"), (W, b), (v, 0.0))
    """
    f = _remote(fun, "jvp")
    if not isinstance(primals, (tuple, list)) or not isinstance(tangents, (tuple, list)):
        raise TypeError("primal and tangent arguments to jvp must be tuples or lists")
    if len(primals) != len(tangents):
        raise TypeError("jvp: primals and tangents must have the same number of arguments")
    flow = f._client._core.compute(f.model, f.chain, "jvp", tuple(primals), tuple(tangents))
    return f._client._run(flow)


def vjp(fun: Any, *primals: Any) -> Any:
    """Vector-Jacobian product: ``fun(*primals)`` and a remote pullback of covectors.

    Args:
      fun: a remote function.
      *primals: its positional arguments.

    Returns:
      ``(fun(*primals), pullback)``; ``pullback(cotangent)`` returns a tuple with one cotangent
      per primal, and ``vmap(pullback)(U)`` pulls back a batch of covectors in one request.
      The server keeps the linearization as a session, so each pullback request carries only
      its cotangent and skips the forward pass (if the session is gone, the product is
      recomputed from the kept primals). ``with vjp(f, x) as (y, pullback):`` closes it.

    >>> y, pullback = vjp(client.model("logistic_predict"), W, b)
    >>> W_bar, b_bar = pullback(u)
    """
    return _sessions.bind(_remote(fun, "vjp"), primals, "vjp")


def linearize(fun: Any, *primals: Any) -> Any:
    """``fun(*primals)`` and a remote pushforward ``f_jvp(*tangents)`` (`jax.linearize`).

    Returns:
      ``(fun(*primals), f_jvp)``; ``vmap(f_jvp)(S)`` pushes a batch of tangents in one request.
      Like `vjp`, it opens a server session: each ``f_jvp`` request carries only tangents.
      ``linearize(grad(f), x)[1]`` is the Hessian-vector product at ``x``, bound.

    >>> y, f_jvp = linearize(client.model("logistic_predict"), W, b)
    >>> f_jvp(v, 0.0)
    >>> with linearize(grad(client.model("tanh_sq_sum")), X) as (g, hvp_at):
    ...     hvp_at(V)  # only V travels
    """
    return _sessions.bind(_remote(fun, "linearize"), primals, "linearize")


def hvp(
    fun: Any,
    primals: Sequence[Any],
    tangents: Sequence[Any],
    argnums: int | Sequence[int] = 0,
    mode: str = "fwd_rev",
) -> Any:
    """Hessian-vector product of a scalar remote function, never forming the Hessian.

    Computes ``jvp(grad(fun, argnums), primals, tangents)[1]``, the cookbook's ``hvp``, with
    respect to the arguments ``argnums`` names only: the others are held fixed, so an integer
    argument (labels, say) may sit beside the differentiated ones.

    Args:
      fun: a remote function with a scalar output.
      primals, tangents: tuples of its arguments and of directions of the same structure
        (entries outside ``argnums`` are ignored: ``0`` will do).
      argnums: the argument(s) to differentiate; an int gives that block of ``H @ v``, a tuple
        a tuple of blocks.
      mode: ``"fwd_rev"`` (forward over reverse, default), ``"rev_fwd"`` or ``"rev_rev"``.

    >>> f = client.model("tanh_sq_sum")
    >>> hvp(f, (X,), (V,))  # shaped like X
    >>> hvp(client.model("mlp_loss"), (x, y), (v, 0))  # in x only; y is int32
    """
    if mode not in HVP_MODES:
        raise ValueError(f"mode must be one of {HVP_MODES}, got {mode!r}")
    f = _remote(fun, "hvp")
    nums = _argnums(argnums)
    flow = f._client._core.compute(
        f.model, f.chain, "hvp", tuple(primals), tuple(tangents), mode=mode, argnums=nums
    )
    return f._client._run(flow)
