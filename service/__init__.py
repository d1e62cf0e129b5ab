"""gradserve's server: a registry of JAX models served with composable transforms over HTTP."""

from service.app import create_app
from service.registry import ConfigOption, ModelDef, Registry, model
from service.settings import Settings

__all__ = ["ConfigOption", "ModelDef", "Registry", "Settings", "create_app", "model"]
