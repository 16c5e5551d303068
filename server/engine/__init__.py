"""The serving engine, usable without HTTP: one base, a module pool, mixed batches."""

from tunehub.server.engine.base import LoadedBase, load_base
from tunehub.server.engine.engine import (
    Engine,
    GenerationRequest,
    GenerationResult,
    PromptTooLong,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from tunehub.server.engine.modules import LoadedModule, UnsupportedModule
from tunehub.server.engine.pool import ModulePool

__all__ = [
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "LoadedBase",
    "LoadedModule",
    "ModulePool",
    "PromptTooLong",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
    "UnsupportedModule",
    "load_base",
]
