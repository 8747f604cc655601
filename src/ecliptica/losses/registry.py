"""The one list of training methods. Every module of `ecliptica.losses` that defines an `AlignmentLoss`
subclass with a `config` model is a method; nothing else in the code base lists them.

API (`from ecliptica.losses import registry`):
  registry.METHODS                name -> loss class, in display order (sft, dpo, cita, then the rest)
  registry.method_names()         the same names as a tuple: CLI choices, study arms, report and figure order
  registry.get_method(name)       the loss class; ValueError naming the choices for an unknown name
  registry.build_loss(cfg)        the loss for a method config (a member of `MethodConfig`)
  registry.MethodConfig           discriminated union of every method's config model, chosen by `name`
  registry.MethodName             Literal of the method names (for typed fields such as a study arm's method)
  registry.settings_for(name, d)  the keys of `d` that method `name` has (a study's block shared by all arms);
                                  a key no method has is an error

Adding a method = one module here (its config model with `name: Literal["x"]`, and its loss class with its
`layout`) + its test.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, Literal, Union

from pydantic import Field

from . import base
from .base import AlignmentLoss, MethodSettings
from .layout import Layout


def _discover() -> dict[str, type[AlignmentLoss]]:
    package = importlib.import_module(__package__)
    found: dict[str, type[AlignmentLoss]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in ("base", "layout", "registry"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, AlignmentLoss)
                and obj.__module__ == module.__name__
                and "config" in obj.__dict__
            ):
                if obj.name in found:
                    raise RuntimeError(f"method {obj.name!r} is defined twice: {found[obj.name]} and {obj}")
                if not isinstance(getattr(obj, "layout", None), Layout):
                    raise RuntimeError(f"method {obj.name!r} ({obj}) declares no `layout` (losses/layout.py)")
                found[obj.name] = obj
    return dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))


METHODS: dict[str, type[AlignmentLoss]] = _discover()
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]
# Union over a runtime tuple of the discovered configs: the `X | Y` form cannot be built from a tuple
MethodConfig = Annotated[
    Union[tuple(cls.config for cls in METHODS.values())],  # type: ignore[valid-type]  # noqa: UP007
    Field(discriminator="name"),
]


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> type[AlignmentLoss]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
    return METHODS[name]


def build_loss(cfg: MethodSettings) -> AlignmentLoss:
    return get_method(cfg.name)(cfg)


def settings_for(name: str, shared: dict[str, Any]) -> dict[str, Any]:
    """The part of a method block shared by several methods that applies to `name`.

    A study's `train.method` block holds settings for all its arms (e.g. `beta` for DPO and CITA,
    `lambda_kl` for CITA only); each arm takes the keys its method has. A key that no method has is a typo.
    """
    known = {k for cls in METHODS.values() for k in cls.config.model_fields}
    unknown = sorted(set(shared) - known)
    if unknown:
        raise ValueError(f"method settings {unknown} belong to no method ({list(METHODS)})")
    fields = get_method(name).config.model_fields
    return {k: v for k, v in shared.items() if k in fields}


__all__ = ["METHODS", "MethodConfig", "MethodName", "base", "build_loss", "get_method", "method_names", "settings_for"]
