"""Settings: one frozen object per process, built from the environment in one place.

Every tunable of the project is read here and nowhere else; modules receive a settings
object instead of calling ``os.getenv``. Environment variables use the ``HD_`` prefix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


def _get(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


@dataclass(frozen=True)
class ImageNames:
    """Names of the container images the project builds or uses.

    A user with a registry may point these at the official images instead, e.g.
    ``HD_IMAGE_RABBITMQ=rabbitmq:3.10-management`` and ``HD_IMAGE_POSTGRES=postgres:15``.
    """

    base: str = "hybrid-dispatcher/base:bookworm"
    rabbitmq: str = "hybrid-dispatcher/rabbitmq:3.10"
    postgres: str = "hybrid-dispatcher/postgres:15"
    app: str = "hybrid-dispatcher/app:latest"
    run_tiny: str = "hybrid-dispatcher/run-tiny:latest"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ImageNames:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            base=_get(env, "HD_IMAGE_BASE", d.base),
            rabbitmq=_get(env, "HD_IMAGE_RABBITMQ", d.rabbitmq),
            postgres=_get(env, "HD_IMAGE_POSTGRES", d.postgres),
            app=_get(env, "HD_IMAGE_APP", d.app),
            run_tiny=_get(env, "HD_IMAGE_RUN_TINY", d.run_tiny),
        )


@dataclass(frozen=True)
class Settings:
    """Settings shared by every process of the project."""

    images: ImageNames = field(default_factory=ImageNames)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(images=ImageNames.from_env(env))
