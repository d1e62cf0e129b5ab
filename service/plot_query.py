"""The pages' plot parameters from a query string: parsed, validated and bounded.

Every value a page's URL may carry is checked here before anything is computed; an
unparseable one is a 400, an out-of-range one a 422, each naming the parameter (the pages show
them as HTML error pages).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from client.errors import InvalidInput, PayloadTooLarge

SAMPLES = (3, 401)  # points along the direction
GRID = (5, 101)  # contour grid, per side
MAX_SPAN = 1e6
MAX_POINT_BYTES = 16 * 1024  # `point` as JSON text (uvicorn refuses longer request lines)
MAX_POINT_ELEMENTS = 4096


def bad(name: str, message: str, status: int = 422) -> InvalidInput:
    return InvalidInput(
        f"query parameter {name!r}: {message}",
        code="invalid_plot_parameter",
        status=status,
        loc=("query", name),
    )


def not_applicable(message: str) -> InvalidInput:
    return InvalidInput(message, code="plot_not_applicable")


@dataclass(frozen=True)
class PlotParams:
    """The plot parameters of a page's query string, validated and bounded."""

    point: Any = None  # the args list, as JSON would give it; None: the model's example
    direction: tuple[float, ...] | None = None
    span: float = 1.0
    samples: int = 101
    grid: int = 41
    box: tuple[float, float, float, float] | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> PlotParams:
        values: dict[str, Any] = {}
        if "point" in query:
            values["point"] = _json_param("point", query["point"])
            if not isinstance(values["point"], list):
                raise bad("point", "must be a JSON list with one entry per model argument")
        if "direction" in query:
            direction = _json_param("direction", query["direction"])
            values["direction"] = _numbers("direction", direction, None)
        if "span" in query:
            span = _number("span", query["span"])
            if not 0 < span <= MAX_SPAN:
                raise bad("span", f"{span:g} is out of range (0, {MAX_SPAN:g}]")
            values["span"] = span
        for name, (low, high) in (("samples", SAMPLES), ("grid", GRID)):
            if name in query:
                text = query[name]
                if not text.strip().isdigit():
                    raise bad(name, "must be a whole number", status=400)
                if not low <= int(text) <= high:
                    raise bad(name, f"{int(text)} is out of range [{low}, {high}]")
                values[name] = int(text)
        if "box" in query:
            box = _numbers("box", query["box"].split(","), 4)
            if not (box[0] < box[1] and box[2] < box[3]):
                raise bad("box", "must be xmin,xmax,ymin,ymax with xmin < xmax and ymin < ymax")
            values["box"] = box
        return cls(**values)

    def query(self) -> dict[str, str]:
        """These parameters as a query string's fields (only those not at their defaults)."""
        out: dict[str, str] = {}
        if self.point is not None:
            out["point"] = json.dumps(self.point, separators=(",", ":"))
        if self.direction is not None:
            out["direction"] = json.dumps(list(self.direction), separators=(",", ":"))
        for name in ("span", "samples", "grid"):
            if getattr(self, name) != getattr(PlotParams, name):
                out[name] = f"{getattr(self, name):g}"
        if self.box is not None:
            out["box"] = ",".join(f"{v:g}" for v in self.box)
        return out


def _json_param(name: str, text: str) -> Any:
    if len(text) > MAX_POINT_BYTES:
        raise PayloadTooLarge(
            f"query parameter {name!r} is {len(text)} characters; the limit is {MAX_POINT_BYTES}",
            code="parameter_too_large",
        )
    try:
        return json.loads(text)
    except ValueError as e:
        raise bad(name, f"is not valid JSON ({e.msg})", status=400) from None


def _number(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad(name, "must be a number", status=400) from None
    if not math.isfinite(number) or abs(number) > MAX_SPAN:
        raise bad(name, f"{number:g} is out of range [-{MAX_SPAN:g}, {MAX_SPAN:g}]")
    return number


def _numbers(name: str, values: Any, count: int | None) -> tuple[float, ...]:
    if not isinstance(values, list) or (count is not None and len(values) != count):
        want = f"{count} comma-separated numbers" if count else "a JSON list of numbers"
        raise bad(name, f"must be {want}", status=400)
    if len(values) > MAX_POINT_ELEMENTS:
        raise bad(name, f"holds {len(values)} numbers; at most {MAX_POINT_ELEMENTS}")
    return tuple(_number(name, v) for v in values)
