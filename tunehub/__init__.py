"""tunehub: train many small task modules on one base model, version them, serve them at once.

The package layout: ``tunehub.registry`` (module format, references, stores),
``tunehub.trainer``, ``tunehub.server`` and ``tunehub.sdk`` (Python client and CLI).
This top-level package stays light: importing it never imports torch.
"""

from __future__ import annotations

from tunehub.errors import *  # noqa: F401,F403
from tunehub.errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = ["__version__", *_errors_all]
