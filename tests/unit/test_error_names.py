"""Every typed error lives in tunehub.errors, and the SDK raises each by the name the server sends."""

import importlib
import json
import pkgutil

import pytest

import tunehub
from tunehub import errors
from tunehub.errors import TunehubError

# every module that may define an error; importing them registers their subclasses
_PACKAGES = ("tunehub", "tunehub.registry", "tunehub.server", "tunehub.server.engine", "tunehub.sdk")


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _every_error():
    for name in _PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.iter_modules(package.__path__, prefix=f"{name}."):
            if not info.ispkg:
                importlib.import_module(info.name)
    return sorted(set(_all_subclasses(TunehubError)) | {TunehubError}, key=lambda c: (c.__module__, c.__name__))


def _instance(cls):
    if cls.__name__ == "_StatusError":
        return cls("x", 400, "InvalidRequest")
    return cls("something went wrong")


def test_every_public_error_lives_in_tunehub_errors():
    public = [cls for cls in _every_error() if not cls.__name__.startswith("_")]
    assert [cls for cls in public if getattr(errors, cls.__name__, None) is not cls] == []
    assert sorted(errors.__all__) == sorted(cls.__name__ for cls in public)
    assert all(getattr(tunehub, cls.__name__) is cls for cls in public)  # the top-level API too


def test_old_import_names_still_work():
    from tunehub.server.engine import PromptTooLong, UnsupportedModule
    from tunehub.server.engine.engine import NonFiniteLogits, RequestCancelled
    from tunehub.server.engine.modules import InvalidModuleWeights

    assert PromptTooLong is errors.PromptTooLong and UnsupportedModule is errors.UnsupportedModule
    assert NonFiniteLogits is errors.NonFiniteLogits and RequestCancelled is errors.RequestCancelled
    assert InvalidModuleWeights is errors.InvalidModuleWeights


@pytest.mark.parametrize("cls", _every_error(), ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_the_sdk_raises_the_type_the_server_named(cls):
    from tunehub.sdk.client import error_from_response
    from tunehub.server.api import error_message
    from tunehub.server.protocol import error_body
    from tunehub.server.spec import TunehubSpec, _status_of

    exc = _instance(cls)
    expected = cls if not cls.__name__.startswith("_") else getattr(errors, errors.public_error_name(exc))
    # raised on the HTTP side: the body names the class
    status = _status_of(exc)
    raised = error_from_response(status, json.dumps(error_body(exc, status)), {})
    assert type(raised) is expected and raised.status_code == status and str(raised) == str(exc)
    # raised in the inference worker: relayed as a message, then answered by the HTTP side
    relayed = TunehubSpec._remote_error(error_message(exc, "req-1"), None)
    status = _status_of(relayed)
    raised = error_from_response(status, json.dumps(error_body(relayed, status)), {})
    assert type(raised) is expected and str(raised) == str(exc)
