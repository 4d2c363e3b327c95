"""RFC 7396 merge patch (the appendix's examples and properties) and entity tags."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inventory.patch import (
    etag_of,
    if_match_passes,
    if_none_match_passes,
    merge_patch,
    parse_etags,
    representation,
    strong_etag,
)
from inventory.schema import JSON

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text("abc", max_size=2)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text("abcd", max_size=2), inner, max_size=4)
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.text("abcd", max_size=2), json_values, max_size=4)


def _without_null_members(value: JSON) -> JSON:
    """A merge patch cannot set a member to null (RFC 7396 §1), so targets avoid that."""
    if isinstance(value, dict):
        return {k: _without_null_members(v) for k, v in value.items() if v is not None}
    return value


no_null_values = json_values.map(_without_null_members)


def merge_diff(source: JSON, target: JSON) -> JSON:
    """A merge patch that turns `source` into `target` (which has no null members)."""
    if not isinstance(source, dict) or not isinstance(target, dict):
        return target
    patch: dict[str, JSON] = {name: None for name in source if name not in target}
    for name, value in target.items():
        if name not in source:
            patch[name] = value
        elif source[name] != value or type(source[name]) is not type(value):
            patch[name] = merge_diff(source[name], value)
    return patch


RFC_7396_APPENDIX_A = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("original", "patch", "result"), RFC_7396_APPENDIX_A)
def test_merge_patch_gives_the_rfc_7396_appendix_results(
    original: JSON, patch: JSON, result: JSON
) -> None:
    assert merge_patch(original, patch) == result


@given(source=json_values, target=no_null_values)
@PROPERTY_SETTINGS
def test_the_diff_of_two_documents_patches_one_into_the_other(source: JSON, target: JSON) -> None:
    assert merge_patch(source, merge_diff(source, target)) == target


@given(target=json_values, patch=json_values)
@PROPERTY_SETTINGS
def test_applying_a_patch_twice_is_the_same_as_once(target: JSON, patch: JSON) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


@given(target=json_values, patch=json_values)
@PROPERTY_SETTINGS
def test_merge_patch_never_modifies_its_arguments(target: JSON, patch: JSON) -> None:
    before = copy.deepcopy((target, patch))
    merge_patch(target, patch)
    assert (target, patch) == before


@given(target=objects, patch=objects)
@PROPERTY_SETTINGS
def test_a_null_member_of_a_patch_is_absent_from_the_result(target: JSON, patch: JSON) -> None:
    result = merge_patch(target, patch)
    for name, value in patch.items():
        assert (name in result) == (value is not None)


@given(target=objects)
@PROPERTY_SETTINGS
def test_an_empty_patch_changes_nothing(target: JSON) -> None:
    assert merge_patch(target, {}) == target


def test_the_representation_is_compact_utf8_in_stored_order() -> None:
    assert representation({"b": 1, "a": "é"}) == '{"b":1,"a":"é"}'.encode()


def test_a_strong_etag_is_a_quoted_digest_that_follows_the_bytes() -> None:
    tag = strong_etag(b"{}")
    assert tag[0] == tag[-1] == '"'
    assert len(tag) == 34
    assert strong_etag(b"{}") == tag != strong_etag(b"{ }")
    assert etag_of({"a": 1}) == strong_etag(json.dumps({"a": 1}, separators=(",", ":")).encode())


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        ("*", ([], True)),
        ('"a"', ([(False, '"a"')], False)),
        ('W/"a", "b"', ([(True, '"a"'), (False, '"b"')], False)),
        (' "a" ,, "b" ,', ([(False, '"a"'), (False, '"b"')], False)),
        ('"a,b"', ([(False, '"a,b"')], False)),
        ("a", None),
        ('"a" "b"', None),
        ('"a', None),
        ("", None),
        ('w/"a"', None),
    ],
)
def test_entity_tag_lists_are_parsed_as_rfc_9110_writes_them(
    header: str, parsed: tuple[list[tuple[bool, str]], bool] | None
) -> None:
    assert parse_etags(header) == parsed


@pytest.mark.parametrize(
    ("header", "passes"),
    [
        (None, True),
        ("*", True),
        ('"cur"', True),
        ('"old", "cur"', True),
        ('"old"', False),
        ('W/"cur"', False),
        ("cur", False),
    ],
)
def test_if_match_compares_strongly(header: str | None, passes: bool) -> None:
    assert if_match_passes(header, '"cur"') is passes


@pytest.mark.parametrize(
    ("header", "passes"),
    [
        (None, True),
        ("*", False),
        ('"cur"', False),
        ('W/"cur"', False),
        ('"old"', True),
        ("junk", True),
    ],
)
def test_if_none_match_compares_weakly(header: str | None, passes: bool) -> None:
    assert if_none_match_passes(header, '"cur"') is passes
