import pytest

from tunehub.errors import InvalidReference
from tunehub.registry.refs import (
    MAX_VERSION,
    ModuleRef,
    parse_ref,
    parse_version,
    validate_alias,
    validate_name,
    version_of_tag,
)


@pytest.mark.parametrize(
    "text, namespace, name, version, alias",
    [
        ("sum", None, "sum", None, None),
        ("acme/sum", "acme", "sum", None, None),
        ("acme/sum@3", "acme", "sum", 3, None),
        ("acme/sum@v12", "acme", "sum", 12, None),
        ("acme/sum@prod", "acme", "sum", None, "prod"),
        ("a.b_c-d@canary-2", None, "a.b_c-d", None, "canary-2"),
    ],
)
def test_parse_valid(text, namespace, name, version, alias):
    ref = ModuleRef.parse(text)
    assert (ref.namespace, ref.name, ref.version, ref.alias) == (namespace, name, version, alias)
    assert ModuleRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "invalid reference"),
        ("a/b/c", "more than one '/'"),
        ("../x", "'..'"),
        ("x/..", "'..'"),
        ("a..b", "'..'"),
        ("/abs", "empty namespace"),
        ("ns/", "empty name"),
        ("Acme/sum", "upper-case"),
        ("sum@", "ends with '@'"),
        ("sum@1@2", "more than one '@'"),
        ("sum@0", "positive integer"),
        ("a\\b", "path separator"),
        ("-lead", "not allowed"),
        (".hidden", "not allowed"),
        ("sp ace", "not allowed"),
        ("x" * 97, "longer than 96"),
        (" sum", "invalid reference"),
        ("sum@Prod", "upper-case"),
    ],
)
def test_parse_refused(text, fragment):
    with pytest.raises(InvalidReference) as info:
        ModuleRef.parse(text)
    assert fragment in str(info.value)


def test_refs_are_value_errors_and_selector():
    with pytest.raises(ValueError):
        parse_ref("A")
    assert parse_ref("x").selector == "latest"
    assert parse_ref("x@4").selector == "4"
    assert parse_ref("x@prod").unversioned() == parse_ref("x")
    assert str(parse_ref("ns/x").with_version(2)) == "ns/x@2"
    with pytest.raises(InvalidReference):
        ModuleRef(name="x", version=1, alias="prod")
    with pytest.raises(InvalidReference):
        parse_ref(3)  # type: ignore[arg-type]


# --- versions are ASCII digits, parsed in one place -------------------------------------------
NOT_A_NUMBER = "is not a number: write versions with the ASCII digits 0-9"


@pytest.mark.parametrize(
    "selector, fragment",
    [
        ("١٢", NOT_A_NUMBER),  # Arabic-Indic digits: int() reads 12
        ("²", NOT_A_NUMBER),  # superscript: isdigit() is True, int() raises ValueError
        ("１", NOT_A_NUMBER),  # full-width: int() reads 1
        ("v١", NOT_A_NUMBER),
        ("½", NOT_A_NUMBER),
        ("+1", NOT_A_NUMBER),  # int() reads 1
        ("-1", NOT_A_NUMBER),
        ("1_0", NOT_A_NUMBER),  # int() reads 10
        ("01", "has a leading zero: write 1"),
        ("v007", "has a leading zero: write 7"),
        ("0", "positive integer"),
        ("9223372036854775808", "is too large"),  # 2**63
        ("9" * 5000, "is too large"),  # int() would raise ValueError (more than 4300 digits)
    ],
)
def test_version_selectors_are_ascii_digits_only(selector, fragment):
    with pytest.raises(InvalidReference) as info:
        ModuleRef.parse(f"acme/sum@{selector}")
    assert fragment in str(info.value)


def test_version_with_a_space_is_refused_as_a_version():
    with pytest.raises(InvalidReference) as info:
        ModuleRef.parse("sum@ 1")  # int(" 1") == 1
    assert str(info.value) == f"version ' 1' {NOT_A_NUMBER}, e.g. 3"


def test_parse_version_is_the_one_conversion():
    assert parse_version("1") == 1 and parse_version("40") == 40
    assert parse_version(str(MAX_VERSION)) == MAX_VERSION == 2**63 - 1
    assert ModuleRef.parse(f"sum@v{MAX_VERSION}").version == MAX_VERSION
    for bad in ("", "١٢", "²", "１", "+1", " 1", "1 ", "1_0", "01", "0", "1.0", "0x1", "1e3", str(2**63), "\n1"):
        with pytest.raises(InvalidReference):
            parse_version(bad)
    with pytest.raises(InvalidReference):
        parse_version(1)  # type: ignore[arg-type]
    for bad in (0, -1, 2**63, True, 1.0, "1"):
        with pytest.raises(InvalidReference, match="positive integer"):
            ModuleRef(name="sum", version=bad)  # type: ignore[arg-type]


def test_version_tags_parse_like_versions():
    assert version_of_tag("v1") == 1 and version_of_tag("v120") == 120
    for other in ("v", "v01", "v0", "v²", "v١", "v+1", "v1_0", "V1", "1", "release", f"v{2**63}", "v" + "9" * 5000):
        assert version_of_tag(other) is None, other


def test_aliases_that_read_as_numbers_are_refused():
    # int("1_0") == 10: an alias no reader may take for version 10
    with pytest.raises(InvalidReference, match="looks like a version number"):
        validate_alias("1_0")
    assert validate_alias("2024-01") == "2024-01" and validate_alias("1.0") == "1.0"
    assert ModuleRef.parse("sum@2024-01").alias == "2024-01"


# --- every tunehub name is a valid Hub repo name ------------------------------------------------
@pytest.mark.parametrize(
    "name, fragment",
    [
        ("a--b", "contains '--', which no Hub repo name may contain"),
        ("sum-", "ends with '-', which no Hub repo name may do"),
        ("sum.", "ends with '.', which no Hub repo name may do"),
        ("sum.git", "ends with '.git', which no Hub repo name may do"),
    ],
)
def test_names_the_hub_refuses_are_refused(name, fragment):
    for text, what in ((name, "name"), (f"{name}/x", "namespace"), (f"x@{name}", "alias")):
        with pytest.raises(InvalidReference) as info:
            ModuleRef.parse(text)
        assert str(info.value) == f"{what} {name!r} {fragment}"


def _name_corpus() -> list[str]:
    """Every name up to 4 characters over the characters that matter, plus long and odd ones."""
    import itertools

    alphabet = "a0._-"
    corpus = ["".join(chars) for size in range(1, 5) for chars in itertools.product(alphabet, repeat=size)]
    corpus += [
        "x" * 95,
        "x" * 96,
        "x" * 97,
        "a" * 95 + "-",
        "x.git",
        "x.gitx",
        "x.git_",
        "x_",
        "_x",
        "A",
        "a b",
        "é",
        "a/b",
        "a\\b",
        "a\x00b",
        "x.git.git",
        "a-.b",
        "a.-b",
        "a_-b",
        "a-_b",
        "ab" * 48,
    ]
    return corpus


def test_every_name_tunehub_accepts_is_a_valid_hub_repo_name():
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    accepted = []
    for name in _name_corpus():
        try:
            validate_name(name)
        except InvalidReference:
            continue
        accepted.append(name)
        for repo_id in (name, f"{name}/{name}", f"acme/{name}"):
            try:
                validate_repo_id(repo_id)
            except HFValidationError as exc:
                pytest.fail(f"tunehub accepts {name!r} but the Hub refuses {repo_id!r}: {exc}")
    assert {"a", "a0", "a.0", "a_", "a-0", "a_-0", "x" * 96} <= set(accepted)  # the corpus is not all refusals
