"""Hard-prompt templates: the format read back from a store is untrusted, rendering substitutes
slot names only, and making a module never writes into a user's folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tunehub.errors import Conflict, InvalidRequest, ManifestError
from tunehub.registry.module import verify_module
from tunehub.registry.template import MAX_SLOTS, MAX_TEMPLATE_BYTES, TEMPLATE_FILE, parse_template
from tunehub.sdk.cli import app


def test_text_and_chat_templates_render_their_slots():
    text = parse_template(json.dumps({"format": "text", "text": "Reverse {{literally}}: {words} ({words})\nAnswer:"}))
    assert text.slots == ("words",)
    assert text.render_text(text.values(None, "a b")) == "Reverse {literally}: a b (a b)\nAnswer:"
    assert (
        text.render_text(text.values({"words": "{x}"})) == "Reverse {literally}: {x} ({x})\nAnswer:"
    )  # values are not templates
    chat = parse_template(
        json.dumps(
            {"format": "chat", "messages": [{"role": "system", "content": "You {verb}."}, {"role": "user", "content": "{item}"}]}
        )
    )
    assert chat.slots == ("verb", "item")
    assert chat.render_messages({"verb": "reverse", "item": "pear"}) == [
        {"role": "system", "content": "You reverse."},
        {"role": "user", "content": "pear"},
    ]
    assert parse_template(text.to_json()) == text and parse_template(chat.to_json()) == chat


def test_requests_must_give_exactly_the_slots():
    template = parse_template(json.dumps({"format": "text", "text": "{a} and {b}"}))
    with pytest.raises(InvalidRequest, match="send their values in 'slots'"):
        template.values(None, "one value for two slots")
    with pytest.raises(InvalidRequest, match="missing b; unknown c"):
        template.values({"a": "1", "c": "3"})
    with pytest.raises(InvalidRequest, match="not both"):
        template.values({"a": "1", "b": "2"}, "and a prompt")
    with pytest.raises(InvalidRequest, match="use /v1/completions"):
        template.check_endpoint(chat=True)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"not json", "not valid JSON"),
        (json.dumps({"format": "yaml", "text": "x"}), '"format" must be "text" or "chat"'),
        (json.dumps({"format": "text", "text": "{0.__class__.__mro__}"}), "a lone '{'"),  # no attribute lookups
        (json.dumps({"format": "text", "text": "{a!r}"}), "a lone '{'"),
        (json.dumps({"format": "text", "text": "close }"}), "a lone '}'"),
        (json.dumps({"format": "text", "text": ""}), "a text template is"),
        (json.dumps({"format": "text", "text": "x", "extra": 1}), "a text template is"),
        (json.dumps({"format": "chat", "messages": [{"role": "tool", "content": "x"}]}), "needs a role of"),
        (json.dumps({"format": "chat", "messages": "hello"}), "a chat template is"),
        (json.dumps({"format": "text", "text": " ".join(f"{{s{i}}}" for i in range(MAX_SLOTS + 1))}), "more than"),
        (json.dumps({"format": "text", "text": "x" * MAX_TEMPLATE_BYTES}), "larger than"),
        ("[" * 10_000, "not valid JSON"),  # deeply nested
    ],
)
def test_hostile_template_files_are_refused(raw, problem):
    with pytest.raises(ManifestError, match=problem.replace("(", r"\(").replace('"', '"')):
        parse_template(raw)


def test_template_init_writes_a_module_and_never_into_a_users_folder(tiny_llama_path, tmp_path):
    out = CliRunner().invoke(
        app,
        ["template", "init", str(tmp_path / "t"), "--base", str(tiny_llama_path), "--text", "Summarize: {text}", "--task", "sum"],
    )
    assert out.exit_code == 0, out.output
    assert "wrote template module" in out.output and "slots: text" in out.output
    manifest = verify_module(tmp_path / "t").manifest
    assert manifest.kind.value == "template" and manifest.params == {"format": "text", "slots": ["text"]}
    assert json.loads((tmp_path / "t" / TEMPLATE_FILE).read_text())["text"] == "Summarize: {text}"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = CliRunner().invoke(app, ["template", "init", str(tmp_path / "mine"), "--base", str(tiny_llama_path), "--text", "x"])
    assert isinstance(refused.exception, Conflict)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and len(list((tmp_path / "mine").iterdir())) == 1
    both = CliRunner().invoke(app, ["template", "init", str(tmp_path / "x"), "--base", str(tiny_llama_path)])
    assert "--text TEXT or --chat FILE" in str(both.exception)
