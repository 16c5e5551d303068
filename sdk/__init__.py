"""The tunehub SDK: ``Registry`` for push/pull and versions. Importing it never imports torch."""

from tunehub.sdk.registry import Registry

__all__ = ["Registry"]
