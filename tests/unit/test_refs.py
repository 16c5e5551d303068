import pytest

from tunehub.errors import InvalidReference
from tunehub.registry.refs import ModuleRef, parse_ref


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
