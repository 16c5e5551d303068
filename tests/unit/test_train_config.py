from pathlib import Path

import pytest
import yaml

from tunehub.errors import ConfigError
from tunehub.registry.manifest import ModuleKind
from tunehub.trainer.config import load_run_config, validate_run_config
from tunehub.trainer.methods import Method, MethodConfig, get_method, method_names, register_method

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _raw(base_path, **sections):
    raw = {
        "base": {"path": str(base_path)},
        "method": {"name": "lora", "r": 4},
        "objective": {"name": "sft"},
        "data": {"train": str(Path(base_path).parent / "x.jsonl")},
        "output": {"dir": "out"},
    }
    for key, value in sections.items():
        raw[key] = value
    return raw


@pytest.fixture
def fake_base(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (base / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    return base


@pytest.fixture
def fake_bert(tmp_path):
    base = tmp_path / "bert"
    base.mkdir()
    (base / "config.json").write_text('{"architectures": ["BertForMaskedLM"], "model_type": "bert"}')
    return base


def test_valid_config_fills_defaults(fake_base):
    config = validate_run_config(_raw(fake_base))
    resolved = config.resolved()
    assert resolved["method"]["alpha"] == 16 and resolved["method"]["target_modules"] == "all-linear"
    assert resolved["training"]["batch_size"] == 4
    assert resolved["data"]["train"] == [str(fake_base.parent / "x.jsonl")]


def test_qlora_defaults_resolve_into_the_recorded_config(fake_base):
    plain = validate_run_config(_raw(fake_base)).resolved()
    assert plain["training"]["gradient_checkpointing"] is False and plain["training"]["cpu_allocator"] == "default"
    qlora = validate_run_config(_raw(fake_base, base={"path": str(fake_base), "quantization": "nf4"})).resolved()
    assert qlora["training"]["gradient_checkpointing"] is True and qlora["training"]["cpu_allocator"] == "lean"
    assert qlora["base"]["compute_dtype"] == "auto"
    chosen = validate_run_config(
        _raw(
            fake_base,
            base={"path": str(fake_base), "quantization": "nf4"},
            training={"gradient_checkpointing": False, "cpu_allocator": "default"},
        )
    ).resolved()
    assert chosen["training"]["gradient_checkpointing"] is False and chosen["training"]["cpu_allocator"] == "default"


def test_every_problem_is_reported_at_once(fake_base):
    raw = _raw(
        fake_base,
        method={"name": "lora", "r": 0, "colour": "red"},
        training={"max_steps": -1, "bogus": 1},
        objective={"name": "sft", "nsp": True},
    )
    raw["extra_section"] = {}
    with pytest.raises(ConfigError) as info:
        validate_run_config(raw)
    text = str(info.value)
    for fragment in (
        "method.r",
        "method.colour: unknown key",
        "training.max_steps",
        "training.bogus: unknown key",
        "extra_section: unknown key",
    ):
        assert fragment in text, fragment
    assert len(info.value.problems) >= 5


def test_invalid_combinations(fake_base, fake_bert):
    cases = [
        (_raw(fake_base, objective={"name": "mlm"}), "needs an encoder"),
        (_raw(fake_bert), "needs a causal LM base"),
        (_raw(fake_base, objective={"name": "clm", "template": "chatml"}), "only for the sft objective"),
        (_raw(fake_bert, objective={"name": "mlm"}, data={"train": "x", "packing": True}), "packing applies"),
        (_raw(fake_base, data={"train": "/nope/data.jsonl"}), "data.train: /nope/data.jsonl does not exist"),
        (_raw(fake_base, training={"optimizer": "paged_adamw_8bit"}), "paged optimizers"),
        (_raw(fake_base, method={"name": "adalora", "init_r": 4, "target_r": 8}), "must not exceed init_r"),
        (
            _raw(fake_base, method={"name": "adalora", "tinit": 5, "tfinal": 5}, training={"max_steps": 10}),
            "must be below training.max_steps",
        ),
        (_raw(fake_base, method={"name": "nope"}), "is not a method"),
        (_raw(fake_base / "missing"), "does not exist"),
        (_raw(fake_base.parent), "not a model folder"),
        (_raw(fake_base, output={"dir": "o", "push": "../x"}), "'..'"),
    ]
    for raw, fragment in cases:
        with pytest.raises(ConfigError, match=fragment):
            validate_run_config(raw)


def test_overrides_and_yaml_errors(tmp_path, fake_base):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(fake_base)))
    config = load_run_config(path, ["training.max_steps=7", "method.r=16", "data.packing=true"])
    assert (config.training.max_steps, config.method.r, config.data.packing) == (7, 16, True)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_run_config(path, ["nonsense"])
    with pytest.raises(ConfigError, match="training.nope: unknown key"):
        load_run_config(path, ["training.nope=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "absent.yaml")
    path.write_text("base: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(path)


def test_relative_paths_follow_the_yaml_folder(tmp_path, fake_base):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "train.jsonl").write_text("{}\n")
    raw = _raw(fake_base, data={"train": "train.jsonl"})
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(raw))
    config = load_run_config(tmp_path / "cfg" / "run.yaml")
    assert config.data.train == [str(tmp_path / "cfg" / "train.jsonl")]


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_configs_validate(example, tiny_llama_path, tiny_bert_path):
    base = tiny_bert_path if "bert" in example else tiny_llama_path
    config = load_run_config(EXAMPLES / example, [f"base.path={base}"])
    for source in config.data.train:
        assert Path(source).exists(), f"{example} names missing data {source}"
    assert config.method.name in method_names()


def test_method_registry_checks():
    assert {"lora", "dora", "adalora"} <= set(method_names())
    assert get_method("dora").kind is ModuleKind.DORA
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("nope")

    class Bad(MethodConfig):
        name: str = "other"

    with pytest.raises(ValueError, match="must default to 'bad'"):
        register_method(Method(name="bad", kind=ModuleKind.LORA, config_cls=Bad, build_peft_config=lambda c, x: None))
    with pytest.raises(ValueError, match="lowercase"):
        register_method(Method(name="Bad", kind=ModuleKind.LORA, config_cls=Bad, build_peft_config=lambda c, x: None))
    lora = get_method("lora")
    with pytest.raises(ValueError, match="registered twice"):
        register_method(
            Method(name="lora", kind=ModuleKind.LORA, config_cls=lora.config_cls, build_peft_config=lambda c, x: None)
        )


def test_run_config_method_is_the_typed_union_of_registered_methods(fake_base, monkeypatch):
    """A method registered later is a valid `method.name` with no edit to the run config; the
    validated `config.method` is that method's own typed config, dumped with all its fields."""
    from typing import Literal

    from tunehub.trainer import methods
    from tunehub.trainer.methods.lora import LoraMethodConfig

    config = validate_run_config(_raw(fake_base, method={"name": "lora", "r": 4}))
    assert type(config.method) is LoraMethodConfig and config.method.r == 4
    assert config.resolved()["method"]["rslora"] is False

    with pytest.raises(
        ConfigError,
        match=rf"^method.name: 'toy' is not a method; choose one of {', '.join(method_names())}$",
    ):
        validate_run_config(_raw(fake_base, method={"name": "toy"}))

    class ToyMethodConfig(MethodConfig):
        name: Literal["toy"] = "toy"
        width: int = 3

    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))  # the registration ends with this test
    register_method(Method(name="toy", kind=ModuleKind.LORA, config_cls=ToyMethodConfig, build_peft_config=lambda c, x: None))
    toy = validate_run_config(_raw(fake_base, method={"name": "toy", "width": 5}))
    assert type(toy.method) is ToyMethodConfig and toy.method.width == 5
    assert toy.resolved()["method"] == {"name": "toy", "width": 5}
    with pytest.raises(ConfigError, match=r"^method.width: Input should be a valid integer"):
        validate_run_config(_raw(fake_base, method={"name": "toy", "width": "wide"}))


def test_every_module_kind_is_trained_by_a_method_or_refused_with_what_to_do_instead(fake_base):
    from tunehub.trainer.methods import NOT_TRAINABLE

    trained = {get_method(name).kind for name in method_names()}
    assert trained.isdisjoint(NOT_TRAINABLE), "a kind a method trains must leave NOT_TRAINABLE"
    for kind in ModuleKind:
        if kind in trained:
            continue
        assert kind in NOT_TRAINABLE, f"{kind.value}: neither trained nor refused"
        with pytest.raises(ConfigError) as refusal:
            validate_run_config(_raw(fake_base, method={"name": kind.value}))
        assert str(refusal.value) == f"method.name: {kind.value} modules cannot be trained by tunehub yet; {NOT_TRAINABLE[kind]}"
    assert trained == {
        ModuleKind.LORA,
        ModuleKind.DORA,
        ModuleKind.ADALORA,
        ModuleKind.IA3,
        ModuleKind.PROMPT,
        ModuleKind.PREFIX,
        ModuleKind.PTUNING,
        ModuleKind.MULTITASK_PROMPT,
        ModuleKind.SELECTIVE,
        ModuleKind.BOTTLENECK,
        ModuleKind.FULL,
        ModuleKind.TOKENIZER,
    }


@pytest.mark.parametrize(
    ("method", "sections", "problem"),
    [
        ({"name": "prompt"}, {"packing": True}, "data.packing: prompt puts virtual tokens before each example"),
        ({"name": "prefix", "num_virtual_tokens": 4}, {"objective": {"name": "mlm"}}, "objective.name: prefix trains causal LMs"),
        ({"name": "prompt", "init": "text"}, {}, "method.init_text: init: text needs the text"),
        ({"name": "prompt", "init_text": "hi"}, {}, "method.init_text is used only with init: text"),
        ({"name": "prefix", "encoder_hidden_size": 8}, {}, "it needs projection: true"),
        ({"name": "prefix"}, {"training": {"gradient_checkpointing": True}}, "prefix tuning cannot train with it"),
        ({"name": "ia3", "feedforward_modules": ["down_proj"]}, {}, "method.feedforward_modules needs method.target_modules"),
        ({"name": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, {}, "(not in it: down_proj)"),
        ({"name": "ptuning", "encoder": "gru"}, {}, "method.encoder: Input should be 'mlp' or 'lstm'"),
        ({"name": "multitask_prompt"}, {}, "data.train: a source run learns a prompt shared by several tasks"),
        ({"name": "selective"}, {}, "choose what to train: layers, patterns, bitfit and/or layernorm"),
        ({"name": "selective", "layers": [-1]}, {}, "method.layers: block indices start at 0"),
        ({"name": "selective", "bitfit": True}, {"base": "nf4"}, "selective fine-tuning trains the base's own tensors"),
        ({"name": "full"}, {"base": "nf4"}, "full fine-tuning trains every weight"),
        ({"name": "full", "max_shard_size": "2 GiB"}, {}, "method.max_shard_size: String should match pattern"),
        ({"name": "multitask_prompt", "init": "average"}, {}, "method.init: average needs method.init_from"),
        ({"name": "multitask_prompt", "init_from": "acme/src@1"}, {}, "a target run (init_from) starts from the source"),
        ({"name": "multitask_prompt", "init_from": "acme/src@@1", "init": "task"}, {}, "method.init_from: "),
    ],
)
def test_peft_methods_refuse_what_they_cannot_train(fake_base, method, sections, problem):
    raw = _raw(fake_base, method=method)
    raw["data"]["packing"] = sections.pop("packing", False)
    if sections.pop("base", None) == "nf4":
        raw["base"]["quantization"] = "nf4"
    raw.update(sections)
    with pytest.raises(ConfigError) as refusal:
        validate_run_config(raw)
    assert problem in str(refusal.value)


def test_prefix_tuning_leaves_gradient_checkpointing_off_on_a_4bit_base(fake_base):
    nf4 = {"path": str(fake_base), "quantization": "nf4"}
    raw = _raw(fake_base, base=nf4, method={"name": "prefix"})
    assert validate_run_config(raw).training.gradient_checkpointing is False
    assert validate_run_config(_raw(fake_base, base=nf4, method={"name": "prompt"})).training.gradient_checkpointing is True


def test_fsdp_is_refused_where_it_cannot_shard(fake_base):
    """FSDP shards full-precision base weights under adapters: a bitsandbytes base and a method
    that trains the base's own tensors are refused before anything loads; LoRA is accepted."""
    fsdp = {"distributed": "fsdp"}
    assert validate_run_config(_raw(fake_base, training=fsdp)).resolved()["training"]["distributed"] == "fsdp"
    assert validate_run_config(_raw(fake_base)).resolved()["training"]["distributed"] == "ddp"
    for quantization in ("nf4", "int8"):
        raw = _raw(fake_base, base={"path": str(fake_base), "quantization": quantization}, training=fsdp)
        with pytest.raises(ConfigError, match=f"fsdp shards full-precision weights; a {quantization} base"):
            validate_run_config(raw)
    with pytest.raises(ConfigError, match="selective trains the base's own tensors"):
        validate_run_config(_raw(fake_base, method={"name": "selective", "layernorm": True}, training=fsdp))
    with pytest.raises(ConfigError, match="training.distributed"):
        validate_run_config(_raw(fake_base, training={"distributed": "zero3"}))


def test_launches_that_would_not_shard_as_asked_are_refused(fake_base, monkeypatch):
    from tunehub.trainer.run import check_launch

    config = validate_run_config(_raw(fake_base, training={"distributed": "fsdp"}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(config)
    # accelerate's own FSDP is GPU-only: on the CPU --use_fsdp would quietly train DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="launch without --use_fsdp and set training.distributed: fsdp"):
        check_launch(config)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ConfigError, match="--resume: a training.distributed: fsdp run's checkpoints hold no optimizer"):
        check_launch(config, resume=True)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process shards nothing, so it resumes as any run
    check_launch(config, resume=True)
