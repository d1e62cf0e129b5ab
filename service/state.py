"""What one running server holds: settings, registry, engine, metrics and readiness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from client.errors import ServerBusy
from client.specs import spec_to_json
from service.engine import Engine
from service.metrics import Metrics
from service.registry import Model, Registry
from service.settings import Settings
from service.transforms import OPS


@dataclass
class State:
    settings: Settings
    registry: Registry
    engine: Engine
    metrics: Metrics
    ready: bool = False
    draining: bool = False

    def raise_unless_ready(self) -> None:
        if self.draining:
            raise ServerBusy("the server is shutting down", code="shutting_down", status=503)
        if not self.ready:
            raise ServerBusy(
                "the server is still loading and warming its models",
                code="not_ready",
                status=503,
                headers={"Retry-After": "1"},
            )

    def describe(self, model: Model, full: bool) -> dict[str, Any]:
        spec = model.spec
        info: dict[str, Any] = {
            "name": spec.name,
            "version": spec.version,
            "description": spec.description,
            "device": str(self.engine.device_for(model)),
        }
        if full:
            info["inputs"] = None if spec.inputs is None else [spec_to_json(s) for s in spec.inputs]
            info["output"] = spec_to_json(spec.output)
            info["ops"] = [*OPS, "linearize"]
            info["config"] = [
                {"name": o.name, "type": o.type.__name__, "default": o.default}
                | ({"description": o.description} if o.description else {})
                for o in spec.config
            ]
        return info
