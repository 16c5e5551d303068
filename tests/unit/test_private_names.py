"""The HTTP servers stand on their frameworks' public contracts: LitServe's internals are reached
from server/litserve_bridge.py only (where tests/unit/test_litserve_bridge.py guards them), no code
uses the stdlib's http.server, and nothing imports a private name of the web frameworks. PEFT's
internals (the PeftType enum's member tables, BaseTuner's underscore hooks, its private modules)
are touched in tunehub/peft_methods/bottleneck.py only, where tests/unit/test_bottleneck.py checks
them against the pinned peft."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ["registry", "server", "sdk", "trainer", "tunehub", "benchmarks"]
BRIDGE = REPO / "server" / "litserve_bridge.py"
#: the one file allowed PEFT's internals: registering a PEFT method needs them (see its docstring)
PEFT_METHOD = REPO / "tunehub" / "peft_methods" / "bottleneck.py"

# submodule imports (litserve's public API is its top-level names) and the internals the bridge wraps
LITSERVE_INTERNALS = re.compile(
    r"from\s+litserve\.\w+|import\s+litserve\.\w+|\blitserve\.(?!LitAPI\b|LitServer\b|Callback\b|Request\b|Response\b)\w+\."
    r"|\b(?:LitAPIStatus|ResponseBufferItem|_shutdown_event|inference_workers|litapi_connector|response_buffer"
    r"|request_queue|response_queue_id|_get_request_queue|uvicorn_graceful_timeout|_SENTINEL_VALUE)\b"
)
HTTP_SERVER = re.compile(r"\bhttp\.server\b|\bBaseHTTPRequestHandler\b|\bThreadingHTTPServer\b")
FRAMEWORK_PRIVATE = re.compile(
    r"from\s+(?:litserve|starlette|uvicorn|fastapi)[\w.]*\s+import\s+(?:\(\s*)?(?:[\w\s,]*,\s*)?_\w"
    r"|(?:from|import)\s+(?:litserve|starlette|uvicorn|fastapi)(?:\.\w+)*\._\w"
)

PEFT_PRIVATE = re.compile(
    r"from\s+peft[\w.]*\s+import\s+(?:\(\s*)?(?:[\w\s,]*,\s*)?_\w"
    r"|(?:from|import)\s+peft(?:\.\w+)*\._\w"
    r"|\bpeft(?:\.\w+)*\._(?!_)\w"
    r"|\b_(?:member_map|value2member_map|member_names)_\b"
    r"|\bPEFT_TYPE_TO_\w+_MAPPING\b"
    r"|\b_(?:create_and_replace|replace_module|prepare_adapter_config|prepare_model|check_merge_allowed"
    r"|move_adapter_to_device_of_base_layer|mark_only_adapters_as_trainable|cast_adapter_dtype"
    r"|get_adapter_state_dict|remove_adapter_name_from_key|disable_adapters|active_adapter)\b"
)


def _code_files() -> list[Path]:
    files = []
    for folder in CODE_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if not any(part.is_symlink() for part in [path, *path.parents] if part != REPO and REPO in part.parents):
                files.append(path)
    return files


def _hits(pattern: re.Pattern[str], path: Path) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]


def test_the_scan_sees_the_code():
    files = _code_files()
    assert BRIDGE in files and REPO / "server" / "spec.py" in files and len(files) > 40
    assert _hits(LITSERVE_INTERNALS, BRIDGE), "the pattern no longer matches the bridge's own use"


def test_litserve_internals_only_in_the_bridge():
    hits = [hit for path in _code_files() if path != BRIDGE for hit in _hits(LITSERVE_INTERNALS, path)]
    assert not hits, "LitServe internals outside server/litserve_bridge.py:\n" + "\n".join(hits)


def test_no_code_uses_the_stdlib_http_server():
    hits = [hit for path in _code_files() for hit in _hits(HTTP_SERVER, path)]
    assert not hits, "\n".join(hits)


def test_no_private_names_of_the_web_frameworks_are_imported():
    hits = [hit for path in _code_files() if path != BRIDGE for hit in _hits(FRAMEWORK_PRIVATE, path)]
    assert not hits, "\n".join(hits)
    assert FRAMEWORK_PRIVATE.search("from starlette.routing import Route, _private")
    assert FRAMEWORK_PRIVATE.search("from uvicorn._types import X")
    assert not FRAMEWORK_PRIVATE.search("from starlette.routing import Route")


def test_peft_internals_only_in_the_bottleneck_method():
    files = _code_files()
    assert PEFT_METHOD in files
    assert _hits(PEFT_PRIVATE, PEFT_METHOD), "the pattern no longer matches the PEFT method's own use"
    hits = [hit for path in files if path != PEFT_METHOD for hit in _hits(PEFT_PRIVATE, path)]
    assert not hits, "PEFT internals outside tunehub/peft_methods/bottleneck.py:\n" + "\n".join(hits)
    assert PEFT_PRIVATE.search("from peft.tuners._buffer_dict import BufferDict")
    assert PEFT_PRIVATE.search("from peft.utils import _get_submodules")
    assert PEFT_PRIVATE.search("PeftType._member_map_['X'] = member")
    assert not PEFT_PRIVATE.search("from peft import LoraConfig, get_peft_model")
    assert not PEFT_PRIVATE.search('"peft": peft.__version__,')
