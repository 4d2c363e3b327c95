"""The device JSON Schema: loading it, and validating what clients send against it.

`schemas/device.schema.json` (draft 2020-12) is the single source of truth. It describes the
device as the server serves it; what a client may send is derived from it, not written twice:

- a property marked `readOnly` is the server's, so sending it at all is an error;
- a property with a `default` may be left out, and `with_defaults` fills it in;
- every other `required` property must be present;
- `additionalProperties: false` reports each unknown member at its own JSON Pointer.

Every error is a `FieldError` whose `path` is a JSON Pointer (RFC 6901) to the offending
member, also for missing, unknown and server-owned members, so a client can show each
message next to the field it concerns.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final, TypeAlias

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.protocols import Validator

JSON: TypeAlias = Any
"""A value decoded from JSON: the only place `Any` enters the inventory."""

SOURCE_SCHEMAS: Final = Path(__file__).resolve().parent.parent / "schemas"  # the repository's


def schema_file(name: str) -> Traversable:
    """A schema from the top-level `schemas/`: the copy a built wheel carries inside the package
    (setup.py puts it there), else the repository's own file (source checkout, editable install)."""
    packaged = resources.files("inventory") / "_schemas" / name
    return packaged if packaged.is_file() else SOURCE_SCHEMAS / name


DEVICE_SCHEMA_PATH: Final = schema_file("device.schema.json")

SERVER_OWNED_MESSAGE: Final = "server-owned field: the server sets it, do not send it"
UNKNOWN_FIELD_MESSAGE: Final = "unknown field"
MISSING_FIELD_MESSAGE: Final = "required field is missing"
MAX_MESSAGE_CHARS: Final = 200


@dataclass(frozen=True, slots=True, order=True)
class FieldError:
    """One schema violation, as it appears in a 422 problem's `errors` member."""

    path: str  # JSON Pointer to the offending member; "" is the whole document
    message: str

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


def json_pointer(parts: Iterable[str | int]) -> str:
    """Join path segments into a JSON Pointer, escaping `~` and `/` (RFC 6901 §3)."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _read_only(
    validator: Validator, value: JSON, instance: JSON, schema: Mapping[str, JSON]
) -> Iterator[ValidationError]:
    if value is True:
        yield ValidationError(SERVER_OWNED_MESSAGE)


def _required(
    validator: Validator, required: JSON, instance: JSON, schema: Mapping[str, JSON]
) -> Iterator[ValidationError]:
    if validator.is_type(instance, "object"):
        for name in required:
            if name not in instance:
                yield ValidationError(MISSING_FIELD_MESSAGE, path=[name])


_STANDARD_ADDITIONAL: Final = Draft202012Validator.VALIDATORS["additionalProperties"]


def _additional_properties(
    validator: Validator, allowed: JSON, instance: JSON, schema: Mapping[str, JSON]
) -> Iterator[ValidationError]:
    # The standard keyword reports unknown members at their parent; we point at each one.
    if allowed is not False or "patternProperties" in schema:
        yield from _STANDARD_ADDITIONAL(validator, allowed, instance, schema)
        return
    if validator.is_type(instance, "object"):
        known = schema.get("properties", {})
        for name in instance:
            if name not in known:
                yield ValidationError(UNKNOWN_FIELD_MESSAGE, path=[name])


# The stubs leave `extend` untyped; it returns a validator class like Draft202012Validator.
_InputValidator: Final[type[Validator]] = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    {
        "readOnly": _read_only,
        "required": _required,
        "additionalProperties": _additional_properties,
    },
)


def derive_input_schema(schema: Mapping[str, JSON]) -> dict[str, JSON]:
    """The schema a request body must meet, derived from the full device schema.

    A `readOnly` property keeps only its `readOnly` flag, so sending it yields exactly one
    "server-owned field" error whatever its value. `required` loses the read-only
    properties and those with a `default`.
    """
    derived = copy.deepcopy(dict(schema))
    properties: dict[str, JSON] = derived.get("properties", {})
    server_owned = {name for name, sub in properties.items() if sub.get("readOnly") is True}
    for name in server_owned:
        properties[name] = {"readOnly": True}
    derived["required"] = [
        name
        for name in derived.get("required", [])
        if name not in server_owned and "default" not in properties.get(name, {})
    ]
    return derived


def _error_to_field(error: ValidationError) -> FieldError:
    message = error.message
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return FieldError(json_pointer(error.absolute_path), message)


class DeviceSchema:
    """The loaded device schema and everything the service derives from it."""

    def __init__(self, schema: Mapping[str, JSON]) -> None:
        Draft202012Validator.check_schema(schema)
        self.document: Final[Mapping[str, JSON]] = schema
        properties: Mapping[str, JSON] = schema["properties"]
        self.server_owned: Final = frozenset(
            name for name, sub in properties.items() if sub.get("readOnly") is True
        )
        self.defaults: Final[Mapping[str, JSON]] = {
            name: sub["default"] for name, sub in properties.items() if "default" in sub
        }
        self.device_types: Final[tuple[str, ...]] = tuple(properties["type"]["enum"])
        self._input = _InputValidator(derive_input_schema(schema))
        self._output = Draft202012Validator(
            schema, format_checker=Draft202012Validator.FORMAT_CHECKER
        )

    @classmethod
    def load(cls, path: Traversable = DEVICE_SCHEMA_PATH) -> DeviceSchema:
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def input_errors(self, document: JSON) -> list[FieldError]:
        """Every reason `document` is not acceptable as a client's device, sorted by path."""
        return sorted({_error_to_field(e) for e in self._input.iter_errors(document)})

    def server_owned_errors(self, document: JSON) -> list[FieldError]:
        """Errors for server-owned members present in `document`, whatever their values.

        A merge patch can name a member with `null` to delete it; for a server-owned
        member that is still a client touching the server's field.
        """
        if not isinstance(document, dict):
            return []
        owned = sorted(self.server_owned.intersection(document))
        return [FieldError(json_pointer([name]), SERVER_OWNED_MESSAGE) for name in owned]

    def output_errors(self, device: JSON) -> list[FieldError]:
        """Every way a served device departs from the schema (used by the tests)."""
        return sorted({_error_to_field(e) for e in self._output.iter_errors(device)})

    def with_defaults(self, document: Mapping[str, JSON]) -> dict[str, JSON]:
        """A copy of `document` with each missing defaulted property set to its default."""
        filled = dict(document)
        for name, default in self.defaults.items():
            if name not in filled:
                filled[name] = copy.deepcopy(default)
        return filled


DEVICE_SCHEMA: Final = DeviceSchema.load()
"""Loaded at import, before any event loop runs, so no request ever reads the file."""
