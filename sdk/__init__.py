"""The tunehub SDK: ``Registry`` for push/pull and versions, ``Client``/``AsyncClient`` for a
``tunehub serve`` server. Importing it never imports torch; the clients load on first use."""

from typing import Any

from tunehub.sdk.registry import Registry

__all__ = ["AsyncClient", "Client", "Registry"]


def __getattr__(name: str) -> Any:
    """The client classes, imported on first use (so ``import tunehub.sdk`` needs no httpx).

    Raises:
        AttributeError: ``name`` is none of them.
    """
    if name in ("Client", "AsyncClient", "Completion", "CompletionStream", "AsyncCompletionStream", "Chunk"):
        from tunehub.sdk import client

        return getattr(client, name)
    raise AttributeError(f"module 'tunehub.sdk' has no attribute {name!r}")
