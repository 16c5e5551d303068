"""The ``tokenizer`` module kind: an extended tokenizer and the trained rows of its new tokens,
optionally with a LoRA (or DoRA) component trained with them.

A run with ``tokenizer: {extend: {...}}`` extends the base's tokenizer (``extend_tokenizer``),
gives the model rows for the new tokens (``init_new_rows``), trains them with PEFT's trainable
tokens (``trainable_token_indices`` beside a LoRA; ``TrainableTokensConfig`` for the method
``tokenizer`` alone) and writes::

    tokenizer.json, tokenizer_config.json   the extended tokenizer (with the base's chat template)
    tokenizer_extension.json                the extension's report (tokens, ids, old pieces, measures)
    new_rows.safetensors                    embed_tokens (k, hidden) and lm_head (k, hidden), float32,
                                            the k added tokens' trained rows in id order (lm_head is
                                            absent when the base ties its head to its embedding)
    adapter_config.json, adapter_model.safetensors   the LoRA component, as a LoRA module has them

The added ids are ``base_vocab .. base_vocab + k - 1``, ``base_vocab`` being the base
tokenizer's ``len()``. A base whose embedding has more rows than its tokenizer has tokens (padding
rows) keeps them all: the new tokens take the rows from ``base_vocab`` on, and the model is
resized only when they need more rows than it has (never shrunk). Only the new rows are stored,
never a vocabulary-sized matrix.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunehub.errors import ConfigError, IncompatibleBase, IntegrityError
from tunehub.registry.manifest import PEFT_TYPES, Manifest, ModuleKind
from tunehub.trainer.tokenizers import EXTENSION_REPORT, ExtensionReport, extend_tokenizer, init_new_rows

if TYPE_CHECKING:
    import torch

    from tunehub.trainer.config import RunConfig

NEW_ROWS_FILE = "new_rows.safetensors"
EMBED_ROWS = "embed_tokens"
HEAD_ROWS = "lm_head"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the template beside the config


@dataclass(frozen=True)
class Extension:
    """The extended tokenizer a run trains with."""

    folder: Path  # tokenizer files and tokenizer_extension.json
    report: ExtensionReport

    @property
    def base_vocab(self) -> int:
        return self.report.base_vocab_size

    @property
    def ids(self) -> list[int]:
        return [token.id for token in self.report.added]


def extend_for_run(config: RunConfig, base_dir: Path, work_dir: Path) -> Extension:
    """Extend ``base_dir``'s tokenizer as ``config.tokenizer.extend`` says, into
    ``work_dir/tokenizer`` (replaced: the choice is a function of the corpus, so a resumed run
    gets the same tokens). Raises DataError for an empty or binary corpus, ConfigError else."""
    if config.tokenizer is None:
        raise ConfigError("the run has no tokenizer section to extend the vocabulary with")
    extend = config.tokenizer.extend
    rank = int(os.environ.get("RANK", "0"))
    # each process of a distributed run extends alike (a function of the corpus), in a folder of its own
    folder = work_dir / ("tokenizer" if rank == 0 else f"tokenizer.rank{rank}")
    if folder.exists():
        shutil.rmtree(folder)
    report = extend_tokenizer(
        base_dir,
        extend.corpus,
        extend.max_new,
        folder,
        heldout=extend.heldout if extend.heldout is not None else 0.1,
        init=extend.init,
        min_frequency=extend.min_frequency,
        seed=config.data.seed,
    )
    extension = Extension(folder, report)
    expected = list(range(extension.base_vocab, extension.base_vocab + len(extension.ids)))
    if extension.ids != expected:  # the module layout promises contiguous ids after the base's
        raise IntegrityError(f"the extended tokenizer gave the new tokens ids {extension.ids[:8]}..., not {expected[:8]}...")
    return extension


def head_is_tied(model: Any) -> bool:
    """Whether ``model``'s output head shares its input embedding's weight (or has no head)."""
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def add_new_rows(model: Any, extension: Extension, *, gradient_checkpointing: bool = False) -> dict[str, list[int]]:
    """Give ``model`` its new tokens' rows (``init_new_rows``: resized only when they go past its
    rows) and return what PEFT's ``trainable_token_indices`` takes: the input embedding's name
    (and the untied head's) -> the new ids."""
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < extension.base_vocab:
        raise IncompatibleBase(
            f"the base's embedding has {rows} rows but its tokenizer {extension.base_vocab} tokens: new ids would not follow its rows"
        )
    init_new_rows(model, extension.report)
    if gradient_checkpointing:
        # resizing replaced the embedding module, and with it the hook that makes its output need grad
        model.enable_input_require_grads()
    names = {id(module): name for name, module in model.named_modules()}
    targets = {names[id(model.get_input_embeddings())]: extension.ids}
    if not head_is_tied(model):
        targets[names[id(model.get_output_embeddings())]] = extension.ids
    return targets


def trained_rows(peft_model: Any) -> dict[str, torch.Tensor]:
    """The new tokens' rows as trained: ``embed_tokens`` and, for an untied head, ``lm_head``,
    each (k, hidden) float32 in id order, from PEFT's state dict of the trainable tokens (a tied
    head's adapter follows the embedding's and has no tensors of its own)."""
    from peft import get_peft_model_state_dict

    base = peft_model.get_base_model()
    names = {id(module): name for name, module in peft_model.named_modules()}
    layers = {EMBED_ROWS: names[id(base.get_input_embeddings())]}
    head = base.get_output_embeddings()
    if head is not None:
        layers[HEAD_ROWS] = names[id(head)]
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    found = {}
    for key, layer in layers.items():
        tensors = [v for k, v in state.items() if k.startswith(layer + ".") and k.endswith("trainable_tokens_delta")]
        if len(tensors) > 1 or (key == EMBED_ROWS and not tensors):
            raise IntegrityError(f"the trained model holds {len(tensors)} sets of trainable token rows for {layer}, not 1")
        if tensors:
            found[key] = tensors[0]
    head_rows = found.get(HEAD_ROWS)
    if head_rows is not None and head_rows.data_ptr() == found[EMBED_ROWS].data_ptr():
        del found[HEAD_ROWS]  # a tied head's adapter shares the embedding's rows
    return {key: value.detach().to("cpu", dtype=_float32()).contiguous().clone() for key, value in found.items()}


def _float32() -> Any:
    import torch

    return torch.float32


def save_tokenizer_module(
    peft_model: Any,
    out_dir: Path,
    extension: Extension,
    method: Any,
    **manifest_fields: Any,
) -> Manifest:
    """Write the ``tokenizer`` module of a trained run into ``out_dir`` (the layout above)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from tunehub.trainer.export import peft_params, save_module_files

    out_dir = Path(out_dir)
    copy_tokenizer_files(extension.folder, out_dir)
    rows = trained_rows(peft_model)
    save_file(rows, str(out_dir / NEW_ROWS_FILE), metadata={"format": "pt"})
    components = []
    task_type = manifest_fields.pop("task_type", "CAUSAL_LM")
    if method.kind is not ModuleKind.TOKENIZER:
        from peft.utils import SAFETENSORS_WEIGHTS_NAME

        config = peft_model.peft_config[peft_model.active_adapter]
        # the rows live in new_rows.safetensors alone; the PEFT part is then what a LoRA module
        # is, and the embedding matrix is never saved (save_embedding_layers off)
        state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        adapter = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if "trainable_tokens" not in k}
        save_file(adapter, str(out_dir / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        params = peft_params(config)
        params["trainable_token_indices"] = None
        components.append({"kind": method.kind.value, "params": params})
    report = extension.report
    params = {
        "base_vocab": extension.base_vocab,
        "added": len(report.added),
        "tied_head": EMBED_ROWS in rows and HEAD_ROWS not in rows,
        "init": report.init,
    }
    return save_module_files(
        out_dir,
        kind=ModuleKind.TOKENIZER,
        params=params,
        components=components,
        task_type=task_type,
        tokenizer_path=out_dir,
        **manifest_fields,
    )


def copy_tokenizer_files(source: Path, out_dir: Path) -> None:
    """The extended tokenizer's files and report, the chat template inside
    ``tokenizer_config.json`` (where transformers 4 and 5 both read it)."""
    for name in (*TOKENIZER_FILES, EXTENSION_REPORT):
        shutil.copyfile(source / name, out_dir / name)
    template = source / _CHAT_TEMPLATE_FILE
    if template.is_file():
        config_path = out_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = template.read_text()
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- loading ---------------------------------------------------------------------------------------


def check_tokenizer_module(manifest: Manifest, base_dir: str | Path, where: str) -> None:
    """Refuse a tokenizer module made for another base (fingerprint or tokenizer size)."""
    from transformers import AutoTokenizer

    from tunehub.registry.fingerprint import short_fingerprint
    from tunehub.trainer.export import base_info

    if manifest.kind is not ModuleKind.TOKENIZER:
        raise ConfigError(f"{where} is a {manifest.kind.value} module, not a tokenizer module")
    fingerprint = base_info(base_dir).fingerprint
    if manifest.base.fingerprint != fingerprint:
        raise IncompatibleBase(
            f"{where} extends the tokenizer of base {manifest.base.model_id} (fingerprint"
            f" {short_fingerprint(manifest.base.fingerprint)}), not of {Path(base_dir).name}"
            f" ({short_fingerprint(fingerprint)}): its new rows belong to that base"
        )
    base_vocab = manifest.params.get("base_vocab")
    size = len(AutoTokenizer.from_pretrained(base_dir))
    if base_vocab != size:
        raise IncompatibleBase(f"{where} was made for a base tokenizer of {base_vocab} tokens; {base_dir}'s has {size}")


def load_new_rows(module_dir: str | Path, manifest: Manifest, hidden: int) -> dict[str, torch.Tensor]:
    """The module's new rows, checked against its manifest: the tensors the layout names, each
    (added, hidden)."""
    from safetensors.torch import load_file

    rows = load_file(str(Path(module_dir) / NEW_ROWS_FILE))
    expected = {EMBED_ROWS} if manifest.params.get("tied_head") else {EMBED_ROWS, HEAD_ROWS}
    if set(rows) != expected:
        raise IntegrityError(f"{module_dir}: {NEW_ROWS_FILE} holds {sorted(rows)}, not {sorted(expected)}")
    added = manifest.params.get("added")
    for name, tensor in rows.items():
        if tuple(tensor.shape) != (added, hidden):
            raise IntegrityError(f"{module_dir}: {NEW_ROWS_FILE} {name} is {tuple(tensor.shape)}, not ({added}, {hidden})")
    return rows


def put_new_rows(model: Any, module_dir: str | Path, manifest: Manifest) -> None:
    """Resize ``model`` for the module's tokens (never below its rows) and copy the new rows in."""
    import torch

    base_vocab, added = int(manifest.params["base_vocab"]), int(manifest.params["added"])
    embedding = model.get_input_embeddings()
    needed = base_vocab + added
    if needed > embedding.weight.shape[0]:
        model.resize_token_embeddings(needed, mean_resizing=False)
    rows = load_new_rows(module_dir, manifest, model.get_input_embeddings().weight.shape[1])
    if not manifest.params.get("tied_head") and head_is_tied(model):
        raise IncompatibleBase(f"{module_dir} has head rows for an untied head, but this base ties its head")
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[base_vocab:needed] = rows[EMBED_ROWS].to(embed.dtype)
        if HEAD_ROWS in rows:
            head = model.get_output_embeddings().weight
            head[base_vocab:needed] = rows[HEAD_ROWS].to(head.dtype)


def load_tokenizer_module(module_dir: str | Path, base_dir: str | Path, *, dtype: str = "float32") -> tuple[Any, Any]:
    """The base at ``base_dir`` with a verified tokenizer module applied: (model, tokenizer).
    The model is a PeftModel when the module has a PEFT component. Raises IncompatibleBase for a
    module of another base, IntegrityError for damaged files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunehub.registry.module import verify_module

    module = verify_module(module_dir)
    check_tokenizer_module(module.manifest, base_dir, str(module_dir))
    tokenizer = AutoTokenizer.from_pretrained(module_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype))
    put_new_rows(model, module_dir, module.manifest)
    component = module.manifest.peft_component()
    if component is not None and PEFT_TYPES.get(component.kind):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(module_dir))
    return model.eval(), tokenizer


__all__ = [
    "EMBED_ROWS",
    "HEAD_ROWS",
    "NEW_ROWS_FILE",
    "Extension",
    "add_new_rows",
    "check_tokenizer_module",
    "extend_for_run",
    "head_is_tied",
    "load_new_rows",
    "load_tokenizer_module",
    "put_new_rows",
    "save_tokenizer_module",
    "trained_rows",
]
