"""Server settings: environment variables prefixed `GRADSERVE_`, overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "gradserve" / "jax"


class Settings(BaseSettings):
    """Everything an operator can set. Each field `foo` reads `GRADSERVE_FOO`."""

    model_config = SettingsConfigDict(env_prefix="GRADSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Extra model files or modules, comma-separated in the environment.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    builtin_models: bool = True
    x64: bool = False
    log_level: str = "info"

    # Limits: each refused with its PROTOCOL.md status before any compute.
    max_body_bytes: int = 512 * 2**20
    max_npz_members: int = 4096
    max_transform_depth: int = 8
    max_output_elements: int = 2**27
    request_timeout_s: float = 60.0

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
