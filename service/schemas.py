"""Request and response bodies of every op, as pydantic models.

They validate the small option fields and document the API at `/docs`. Array payloads are
typed `Pytree` and left as parsed JSON: `client.wire` decodes them against the model's specs,
which no static schema can know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from client.errors import InvalidInput

_LEAF_SCHEMAS: list[dict[str, Any]] = [
    {"type": "number"},
    {"type": "boolean"},
    {
        "type": "object",
        "title": "ExplicitLeaf",
        "required": ["dtype", "data"],
        "properties": {
            "dtype": {"type": "string", "examples": ["float32"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": {"type": "array", "description": "flat (C order) or nested values"},
        },
    },
    {
        "type": "object",
        "title": "ComplexLeaf",
        "required": ["dtype", "real", "imag"],
        "properties": {
            "dtype": {"type": "string", "enum": ["complex64", "complex128"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "real": {"type": "array"},
            "imag": {"type": "array"},
        },
    },
    {
        "type": "object",
        "title": "Base64Leaf",
        "required": ["dtype", "shape", "base64"],
        "properties": {
            "dtype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "base64": {"type": "string", "description": "little-endian, C order"},
        },
    },
    {"type": "array", "description": "a plain nested-list array, or a list of pytrees"},
    {"type": "object", "description": "a dict of pytrees"},
]

Pytree = Annotated[
    Any,
    WithJsonSchema(
        {
            "description": "A pytree (dicts, lists) of array leaves: plain numbers or nested "
            "lists, explicit {dtype, shape, data}, complex {dtype, shape, real, imag}, base64, "
            'or {"$npz": name} inside an npz body.',
            "anyOf": _LEAF_SCHEMAS,
        }
    ),
]
Argnums = int | list[int]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TransformSpec(_Body):
    """One function transform of a `call` chain (innermost first)."""

    op: Literal[
        "grad", "value_and_grad", "jacfwd", "jacrev", "jacobian", "hessian", "vmap", "jvp", "vjp"
    ]
    argnums: Argnums | None = None
    has_aux: bool | None = None
    holomorphic: bool | None = None
    mode: Literal["fwd", "rev", "auto"] | None = None
    in_axes: Any = None
    out_axes: Any = None
    value: bool | None = Field(
        None, description="jvp/vjp only: false returns the product alone, without the value"
    )

    def options(self) -> dict[str, Any]:
        """The options the client set; `InvalidInput` for one this transform does not take."""
        given = self.model_fields_set - {"op"}
        unknown = sorted(given - _TRANSFORM_OPTIONS[self.op])
        if unknown:
            raise InvalidInput(
                f"transform {self.op!r} takes no option {unknown[0]!r}",
                code="invalid_request",
                loc=("transforms",),
            )
        values = {k: getattr(self, k) for k in given}
        return {k: v for k, v in values.items() if v is not None or k.endswith("_axes")}


_TRANSFORM_OPTIONS = {
    "grad": {"argnums", "has_aux", "holomorphic"},
    "value_and_grad": {"argnums", "has_aux", "holomorphic"},
    "jacfwd": {"argnums", "has_aux", "holomorphic"},
    "jacrev": {"argnums", "has_aux", "holomorphic"},
    "jacobian": {"argnums", "has_aux", "holomorphic", "mode"},
    "hessian": {"argnums", "holomorphic"},
    "vmap": {"in_axes", "out_axes"},
    # v1.1: after jvp the function takes n primals then tangents (one per argnums entry, all
    # by default) and returns [output, tangent]; after vjp n primals then one cotangent, and
    # returns [output, cotangents].
    "jvp": {"argnums", "value"},
    "vjp": {"argnums", "value"},
}


class OpRequest(_Body):
    args: list[Pytree] = Field(description="positional inputs, each a pytree")
    binary: bool = Field(False, description="answer with base64 leaves instead of explicit ones")
    transforms: list[TransformSpec] = Field(
        default_factory=list,
        description="(extension) transforms applied to the model before this op, innermost first",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="(extension) the model's static options by name; each value compiles once",
    )


class EvalRequest(OpRequest):
    """`f(*args)`."""


class GradRequest(OpRequest):
    """`grad` / `value_and_grad` / `jacfwd` / `jacrev`."""

    argnums: Argnums = 0
    has_aux: bool = False
    holomorphic: bool = False


class JacobianRequest(GradRequest):
    mode: Literal["fwd", "rev", "auto"] = "auto"


class HessianRequest(OpRequest):
    argnums: Argnums = 0
    holomorphic: bool = False


class JvpRequest(OpRequest):
    tangents: list[Pytree] = Field(description="same tree as args")
    batched: bool = False


class VjpRequest(OpRequest):
    cotangent: Pytree = Field(description="same tree as the output")
    batched: bool = False


class HvpRequest(OpRequest):
    tangents: list[Pytree] = Field(
        description="same tree as args; entries outside argnums are ignored (0 will do)"
    )
    argnums: Argnums | None = Field(
        None, description="the arguments to differentiate (default: all, a block each)"
    )
    mode: Literal["fwd_rev", "rev_fwd", "rev_rev"] = "fwd_rev"
    batched: bool = False


class CallRequest(OpRequest):
    """A composition: `transforms` innermost first, e.g. three `grad`s for grad(grad(grad(f)))."""

    transforms: list[TransformSpec] = Field(min_length=1)


REQUESTS: dict[str, type[OpRequest]] = {
    "eval": EvalRequest,
    "grad": GradRequest,
    "value_and_grad": GradRequest,
    "jacfwd": GradRequest,
    "jacrev": GradRequest,
    "jacobian": JacobianRequest,
    "hessian": HessianRequest,
    "jvp": JvpRequest,
    "vjp": VjpRequest,
    "hvp": HvpRequest,
    "call": CallRequest,
}

# Request fields that are options of the op's own transform (the rest are payload).
OP_OPTIONS = {"argnums", "has_aux", "holomorphic", "mode", "batched"}


class _Response(BaseModel):
    pass


class ValueResponse(_Response):
    value: Pytree


class GradResponse(_Response):
    grad: Pytree
    aux: Pytree | None = None


class ValueAndGradResponse(_Response):
    value: Pytree
    grad: Pytree
    aux: Pytree | None = None


class JacobianResponse(_Response):
    jacobian: Pytree
    aux: Pytree | None = None


class HessianResponse(_Response):
    hessian: Pytree


class JvpResponse(_Response):
    value: Pytree
    tangent: Pytree


class VjpResponse(_Response):
    value: Pytree
    cotangents: list[Pytree] = Field(description="one per positional argument")


class HvpResponse(_Response):
    hvp: Pytree = Field(
        description="a block per argument (without argnums), or as argnums names, like grad"
    )


RESPONSES: dict[str, type[_Response]] = {
    "eval": ValueResponse,
    "call": ValueResponse,
    "grad": GradResponse,
    "value_and_grad": ValueAndGradResponse,
    "jacfwd": JacobianResponse,
    "jacrev": JacobianResponse,
    "jacobian": JacobianResponse,
    "hessian": HessianResponse,
    "jvp": JvpResponse,
    "vjp": VjpResponse,
    "hvp": HvpResponse,
}


class Problem(BaseModel):
    """RFC 9457 problem details, with gradserve's stable `code`."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None = None
    errors: list[dict[str, Any]] | None = None


class ModelSummary(BaseModel):
    name: str
    version: str
    description: str
    device: str


class ModelList(BaseModel):
    models: list[ModelSummary]


class ModelInfo(ModelSummary):
    inputs: list[Any] | None = Field(description="one spec tree per positional argument")
    output: Any = None
    ops: list[str]
