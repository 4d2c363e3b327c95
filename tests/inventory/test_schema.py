"""The device schema file, and the input rules the service derives from it."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from inventory.schema import (
    DEVICE_SCHEMA,
    DEVICE_SCHEMA_PATH,
    JSON,
    MISSING_FIELD_MESSAGE,
    SERVER_OWNED_MESSAGE,
    UNKNOWN_FIELD_MESSAGE,
    FieldError,
    derive_input_schema,
    json_pointer,
)
from tests.inventory.conftest import HALL_LIGHT

CONTRACT_TYPES = ("light", "thermostat", "lock", "camera", "sensor", "plug", "speaker", "other")


def test_the_schema_file_is_valid_draft_2020_12_and_its_example_is_a_device() -> None:
    document = json.loads(DEVICE_SCHEMA_PATH.read_text())

    Draft202012Validator.check_schema(document)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["additionalProperties"] is False
    for example in document["examples"]:
        assert DEVICE_SCHEMA.output_errors(example) == []


def test_what_the_service_derives_from_the_schema_matches_the_contract() -> None:
    assert DEVICE_SCHEMA.server_owned == {"id", "created_at", "updated_at"}
    assert DEVICE_SCHEMA.defaults == {"state": {}}
    assert DEVICE_SCHEMA.device_types == CONTRACT_TYPES


def test_the_input_schema_drops_server_owned_and_defaulted_members_from_required() -> None:
    derived = derive_input_schema(DEVICE_SCHEMA.document)

    assert derived["required"] == ["name", "type", "room"]
    assert derived["properties"]["id"] == {"readOnly": True}
    assert "readOnly" not in derived["properties"]["name"]


@pytest.mark.parametrize(
    ("document", "errors"),
    [
        (HALL_LIGHT, []),
        ({"name": "a", "type": "other", "room": "r"}, []),
        ({**HALL_LIGHT, "name": "x" * 100}, []),
        ({**HALL_LIGHT, "name": "💡" * 100}, []),  # characters, not bytes
        ({**HALL_LIGHT, "name": "x" * 101}, [("/name", "is too long")]),
        ({**HALL_LIGHT, "name": ""}, [("/name", "'' should be non-empty")]),
        ({**HALL_LIGHT, "name": 5}, [("/name", "5 is not of type 'string'")]),
        ({**HALL_LIGHT, "type": "lamp"}, [("/type", "'lamp' is not one of")]),
        ({**HALL_LIGHT, "state": "on"}, [("/state", "'on' is not of type 'object'")]),
        ({**HALL_LIGHT, "room": ""}, [("/room", "'' should be non-empty")]),
        ({"type": "light", "room": "hall"}, [("/name", MISSING_FIELD_MESSAGE)]),
        ({**HALL_LIGHT, "colour": "red"}, [("/colour", UNKNOWN_FIELD_MESSAGE)]),
        ({**HALL_LIGHT, "a/b~c": 1}, [("/a~1b~0c", UNKNOWN_FIELD_MESSAGE)]),
        ({**HALL_LIGHT, "id": "1"}, [("/id", SERVER_OWNED_MESSAGE)]),
        ({**HALL_LIGHT, "id": 7}, [("/id", SERVER_OWNED_MESSAGE)]),  # one error, whatever the value
        ({**HALL_LIGHT, "created_at": None}, [("/created_at", SERVER_OWNED_MESSAGE)]),
        ({**HALL_LIGHT, "updated_at": "x"}, [("/updated_at", SERVER_OWNED_MESSAGE)]),
        ([HALL_LIGHT], [("", "is not of type 'object'")]),
        (None, [("", "None is not of type 'object'")]),
    ],
    ids=[
        "ok", "ok-minimal", "name-100", "name-100-emoji", "name-101", "name-empty", "name-int",
        "type-enum", "state-string", "room-empty", "name-missing", "unknown", "unknown-escaped",
        "id", "id-int", "created_at", "updated_at", "array", "null",
    ],
)  # fmt: skip
def test_input_errors_point_at_the_offending_member(
    document: JSON, errors: list[tuple[str, str]]
) -> None:
    found = DEVICE_SCHEMA.input_errors(document)

    assert [e.path for e in found] == [path for path, _ in errors]
    for error, (_, message) in zip(found, errors, strict=True):
        assert message in error.message


def test_every_error_is_listed_sorted_by_path() -> None:
    document = {"id": "1", "name": "", "type": "lamp", "state": [], "extra": True}

    paths = [error.path for error in DEVICE_SCHEMA.input_errors(document)]

    assert paths == ["/extra", "/id", "/name", "/room", "/state", "/type"]


def test_a_long_message_is_cut_short() -> None:
    (error,) = DEVICE_SCHEMA.input_errors({**HALL_LIGHT, "type": "t" * 1000})

    assert len(error.message) <= 200
    assert error.message.endswith("…")


def test_server_owned_errors_flag_members_even_when_null() -> None:
    assert DEVICE_SCHEMA.server_owned_errors({"id": None, "name": "x"}) == [
        FieldError("/id", SERVER_OWNED_MESSAGE)
    ]
    assert DEVICE_SCHEMA.server_owned_errors([1]) == []


def test_defaults_fill_in_missing_members_without_sharing_them() -> None:
    first = DEVICE_SCHEMA.with_defaults({"name": "a"})
    first["state"]["on"] = True

    assert DEVICE_SCHEMA.with_defaults({"name": "b"})["state"] == {}
    assert DEVICE_SCHEMA.with_defaults({"state": {"x": 1}})["state"] == {"x": 1}


@pytest.mark.parametrize(
    ("parts", "pointer"), [([], ""), (["a"], "/a"), (["a/b", 0], "/a~1b/0"), (["~1"], "/~01")]
)
def test_json_pointers_escape_slash_and_tilde(parts: list[str | int], pointer: str) -> None:
    assert json_pointer(parts) == pointer
