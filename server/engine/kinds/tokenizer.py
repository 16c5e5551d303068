"""tokenizer: a vocabulary per request (an extended tokenizer and its new tokens' rows).

A tokenizer module (``tunehub.trainer.tokenizer_module`` writes it) brings its tokenizer
(``tokenizer.json``, ``tokenizer_config.json`` with the chat template), the input and output rows
of the tokens it adds (``new_rows.safetensors``) and, optionally, a LoRA or DoRA component trained
with them. Served, it gives a row:

- its own text in and out: the row's prompt, chat template and streamed text go through the
  module's tokenizer, whose ids below ``base_vocab`` are the base's and whose ids from
  ``base_vocab`` on are its own added tokens (:class:`ModuleVocab`);
- its own id range: the pool gives each loaded tokenizer module a range of engine ids beyond the
  base's vocabulary (``first_id``), disjoint from every other's, freed when it leaves the pool;
  the engine embeds a row's added tokens from the module's rows and scores them with its head
  rows, and a row sees the logits of the base's tokens and of its own module's only (another
  module's tokens, and the base's padding rows, are masked out of it);
- its component's deltas, applied by the low-rank group like any LoRA's (the module's ``served``
  group is then the low-rank one, so it mixes and composes as a LoRA does).

The files are untrusted: the tokenizer must be the base's tokenizer with the module's tokens
added after it (the same ids for every base token, the added ones at ``base_vocab``...), the rows
must have the shapes the manifest states, and the head must be tied or untied as the base's is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tunehub.errors import IncompatibleBase, IntegrityError, InvalidModuleWeights, UnsupportedModule
from tunehub.registry.manifest import ModuleKind
from tunehub.server.engine.kinds import ServedKind, register_kind, served_kind
from tunehub.server.engine.modules import WEIGHTS_FILE, LoadedModule, tensors_from_safetensors

if TYPE_CHECKING:
    from tunehub.server.engine.modules import ModuleMaterializer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
NEW_ROWS_FILE = "new_rows.safetensors"  # (the trainer's tokenizer_module names it too)
EMBED_ROWS, HEAD_ROWS = "embed_tokens", "lm_head"
#: the most tokens one module may add (a tokenizer module's rows are a small part of a vocabulary)
MAX_ADDED = 1 << 16
#: what of ``tokenizer_config.json`` is used: special tokens, the chat template, text options; a
#: ``tokenizer_class`` or anything that would load code is never read
_CONFIG_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "chat_template",
    "model_max_length",
    "clean_up_tokenization_spaces",
)
_LOW_RANK = (ModuleKind.LORA, ModuleKind.DORA)


@dataclass(eq=False)  # compared by identity (it holds tensors)
class ModuleVocab:
    """A served tokenizer module's vocabulary: ids ``< base_vocab`` are the base's tokens, ids
    ``base_vocab .. size - 1`` its own (module ids, what its tokenizer gives and takes). The
    engine calls the latter ``first_id ..`` (engine ids, unique across the modules in the pool)."""

    tokenizer: Any  # transformers' PreTrainedTokenizerFast, built from the module's files alone
    base_vocab: int
    embed_rows: torch.Tensor  # (added, hidden), the base's embedding dtype and device
    head_rows: torch.Tensor  # (added, hidden), float32 on the base's device (the embed rows when the head is tied)
    tokenizer_bytes: int = 0
    first_id: int = -1  # set by the pool when it gives the module its id range

    @property
    def added(self) -> int:
        return int(self.embed_rows.shape[0])

    @property
    def size(self) -> int:
        """The module's vocabulary: base tokens and added ones."""
        return self.base_vocab + self.added

    def engine_id(self, module_id: int) -> int:
        """The engine's id for a module id (base tokens keep theirs)."""
        return module_id if module_id < self.base_vocab else self.first_id + module_id - self.base_vocab

    def module_id(self, engine_id: int, owner: str = "") -> int:
        """The module id of an engine id that is a base token or one of this module's; raises
        RuntimeError for another module's id (the masked logits make it impossible)."""
        if engine_id < self.base_vocab:
            return engine_id
        offset = engine_id - self.first_id
        if not 0 <= offset < self.added:
            raise RuntimeError(f"{owner}: engine id {engine_id} is neither a base token nor one of its own")
        return self.base_vocab + offset

    def embed(self, module_ids: list[int], embedding: Any, device: Any, dtype: Any) -> torch.Tensor:
        """(len, hidden) input embeddings of module ids: the base's rows, then the module's own."""
        ids = torch.tensor(module_ids, device=device)
        own = ids >= self.base_vocab
        out = embedding(torch.where(own, torch.zeros_like(ids), ids)).to(dtype)
        if bool(own.any()):
            out[own] = self.embed_rows[ids[own] - self.base_vocab].to(dtype)
        return out


def build_tokenizer(tokenizer_json: bytes | memoryview, config_json: bytes | memoryview | None, name: str) -> Any:
    """A fast tokenizer from a module's files, without importing anything they name."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        backend = Tokenizer.from_str(bytes(tokenizer_json).decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file is the module's
        raise InvalidModuleWeights(f"{name}: {TOKENIZER_FILE} is not a tokenizer the tokenizers library reads ({exc})") from None
    options: dict[str, Any] = {}
    if config_json is not None:
        try:
            config = json.loads(bytes(config_json))
        except ValueError:
            raise InvalidModuleWeights(f"{name}: {TOKENIZER_CONFIG_FILE} is not JSON") from None
        if not isinstance(config, dict):
            raise InvalidModuleWeights(f"{name}: {TOKENIZER_CONFIG_FILE} is not a JSON object")
        for key in _CONFIG_KEYS:
            value = config.get(key)
            if isinstance(value, dict):  # a serialised AddedToken
                value = value.get("content")
            if value is None:
                continue
            if key == "model_max_length" and not isinstance(value, (int, float)):
                raise InvalidModuleWeights(f"{name}: {TOKENIZER_CONFIG_FILE} {key} is not a number")
            if key != "model_max_length" and key != "clean_up_tokenization_spaces" and not isinstance(value, str):
                raise InvalidModuleWeights(f"{name}: {TOKENIZER_CONFIG_FILE} {key} is not a string")
            options[key] = value
    try:
        return PreTrainedTokenizerFast(tokenizer_object=backend, **options)
    except Exception as exc:  # noqa: BLE001 - as above
        raise InvalidModuleWeights(f"{name}: its tokenizer files do not form a tokenizer ({exc})") from None


class TokenizerKind(ServedKind):
    name = "tokenizer"
    kinds = (ModuleKind.TOKENIZER,)
    reads = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, NEW_ROWS_FILE)

    def materialize_files(
        self,
        materializer: ModuleMaterializer,
        loaded: LoadedModule,
        weights: dict[str, Any],
        files: dict[str, Any],
        name: str,
    ) -> None:
        base = materializer.base
        params = loaded.manifest.params
        base_vocab, added, tied = params.get("base_vocab"), params.get("added"), params.get("tied_head")
        if not (
            isinstance(base_vocab, int) and isinstance(added, int) and _count(base_vocab) and _count(added)
        ) or not isinstance(tied, bool):
            raise InvalidModuleWeights(f"{name}: its manifest's params need base_vocab and added (counts) and tied_head")
        if added > MAX_ADDED:
            raise UnsupportedModule(f"{name} adds {added} tokens; a tokenizer module may add at most {MAX_ADDED}")
        served_vocab = len(base.tokenizer)
        if base_vocab != served_vocab:
            raise IncompatibleBase(
                f"{name} extends a tokenizer of {base_vocab} tokens; this server's base {base.name} has {served_vocab}"
            )
        for rel in self.reads:
            if rel not in files:
                raise IntegrityError(f"{name}: a tokenizer module must carry {rel}")
        tokenizer = build_tokenizer(files[TOKENIZER_FILE], files[TOKENIZER_CONFIG_FILE], name)
        _check_extends(tokenizer, base.tokenizer, base_vocab, added, name)
        rows = tensors_from_safetensors(files[NEW_ROWS_FILE], f"{name}: {NEW_ROWS_FILE}")
        embed_rows, head_rows = _check_rows(rows, materializer, base_vocab, added, tied, name)
        loaded.vocab = ModuleVocab(
            tokenizer=tokenizer,
            base_vocab=base_vocab,
            embed_rows=embed_rows,
            head_rows=head_rows,
            tokenizer_bytes=len(files[TOKENIZER_FILE]),
        )
        self._materialize_component(materializer, loaded, weights, name)

    def _materialize_component(
        self, materializer: ModuleMaterializer, loaded: LoadedModule, weights: dict[str, Any], name: str
    ) -> None:
        """The LoRA or DoRA trained with the rows: materialised and applied by the low-rank group."""
        components = loaded.manifest.components
        if not components:
            if weights:
                raise IntegrityError(f"{name} has no component but carries {WEIGHTS_FILE}")
            return
        component = loaded.manifest.peft_component()
        if len(components) > 1 or component is None or component.kind not in _LOW_RANK:
            kinds_named = ", ".join(part.kind.value for part in components)
            raise UnsupportedModule(f"{name}: a tokenizer module with a {kinds_named} component is not served (lora or dora is)")
        if not weights:
            raise IntegrityError(f"{name}: its {component.kind.value} component has no {WEIGHTS_FILE}")
        group = served_kind(component.kind)
        if group is None:
            raise UnsupportedModule(f"{name}: its {component.kind.value} component's kind is not served")
        manifest = loaded.manifest.model_copy(update={"kind": component.kind, "params": dict(component.params), "components": []})
        part = LoadedModule(key=loaded.key, kind=component.kind, manifest=manifest, served=group)
        group.materialize(materializer, part, weights, name)
        loaded.layers, loaded.data, loaded.served = part.layers, part.data, group


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_extends(tokenizer: Any, base_tokenizer: Any, base_vocab: int, added: int, name: str) -> None:
    """The module's tokenizer is the base's with ``added`` tokens after it."""
    if len(tokenizer) != base_vocab + added:
        raise InvalidModuleWeights(f"{name}: its tokenizer has {len(tokenizer)} tokens, not {base_vocab} + {added}")
    vocab = tokenizer.get_vocab()
    base = base_tokenizer.get_vocab()
    if any(vocab.get(token) != index for token, index in base.items() if index < base_vocab):
        raise IncompatibleBase(f"{name}: its tokenizer does not extend this base's (a base token has another id)")
    own = sorted(index for index in vocab.values() if index >= base_vocab)
    if own != list(range(base_vocab, base_vocab + added)):
        raise InvalidModuleWeights(f"{name}: its added tokens do not have the ids {base_vocab}..{base_vocab + added - 1}")


def _check_rows(
    rows: dict[str, torch.Tensor], materializer: ModuleMaterializer, base_vocab: int, added: int, tied: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    model = materializer.base.model
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    # (a head packed for oneDNN has no weight attribute: it is never a tied one)
    base_tied = head is None or getattr(head, "weight", None) is embedding.weight
    if tied != base_tied:
        raise IncompatibleBase(
            f"{name} has rows for {'a tied' if tied else 'an untied'} output head; this base's head is"
            f" {'tied to its embedding' if base_tied else 'its own'}"
        )
    expected = {EMBED_ROWS} if tied else {EMBED_ROWS, HEAD_ROWS}
    if set(rows) != expected:
        raise InvalidModuleWeights(f"{name}: {NEW_ROWS_FILE} holds {sorted(rows)}, not {sorted(expected)}")
    hidden = int(embedding.weight.shape[1])
    for key, tensor in rows.items():
        if tuple(tensor.shape) != (added, hidden) or not tensor.is_floating_point():
            raise InvalidModuleWeights(
                f"{name}: {NEW_ROWS_FILE} {key} is {tuple(tensor.shape)} {tensor.dtype}, not ({added}, {hidden}) floats"
            )
    device = embedding.weight.device
    embed_rows = rows[EMBED_ROWS].to(device=device, dtype=embedding.weight.dtype).contiguous()
    head_rows = rows[HEAD_ROWS if not tied else EMBED_ROWS].to(device=device, dtype=torch.float32).contiguous()
    return embed_rows, head_rows


register_kind(TokenizerKind())
