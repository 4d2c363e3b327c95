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

Some JSON texts decode to values the service could never send back: a number beyond a 64-bit
float (`1e400` decodes to infinity), a lone UTF-16 surrogate (`"\\ud800"` is not Unicode, so
it has no UTF-8 form), nesting deep enough to exhaust a recursive encoder. `value_errors`
finds each at its pointer, so such a body is a 422 and is never stored. `safe_form` is what
the store serves for a record written before these checks existed.
"""

from __future__ import annotations

import copy
import json
import math
import re
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
MAX_BODY_BYTES: Final = 1024 * 1024  # a larger request body gets a 413 problem
MAX_DEPTH: Final = 32  # levels of arrays and objects in a body; the body itself is level 1
TOO_DEEP_MESSAGE: Final = f"nested deeper than {MAX_DEPTH} levels"
NOT_FINITE_MESSAGE: Final = "number out of range: JSON numbers here must fit a 64-bit float"
SURROGATE_MESSAGE: Final = "text holds a lone UTF-16 surrogate (not Unicode, no UTF-8 form)"
SURROGATE_NAME_MESSAGE: Final = "member name holds a lone UTF-16 surrogate (not Unicode)"
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


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


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def value_errors(document: JSON, *, depth_only: bool = False) -> list[FieldError]:
    """Every value in decoded JSON that could not be served back as JSON, sorted by path.

    Containers (arrays and objects) nested deeper than MAX_DEPTH are reported once each at
    the first level too deep; a document with any gets only those errors. With `depth_only`,
    only nesting is checked. Nothing here recurses, so no input can exhaust the stack, and a
    servable document (the usual case) costs one C-speed encoding, not a walk in Python.
    """
    if _nested_deeper(document, MAX_DEPTH):
        return _nesting_errors(document)
    if depth_only or _encodes(document):
        return []
    return _unservable_values(document)


_CONTAINERS: Final = (dict, list)


def _nested_deeper(value: JSON, levels: int) -> bool:
    """Whether `value` holds containers more than `levels` deep; recurses at most that far."""
    if type(value) is not dict and type(value) is not list:
        return False
    if levels == 0:
        return True
    for member in value.values() if type(value) is dict else value:
        if (type(member) is dict or type(member) is list) and _nested_deeper(member, levels - 1):
            return True
    return False


def _nesting_errors(document: JSON) -> list[FieldError]:
    # The slow search for the pointers, level by level, once `_nested_deeper` said yes.
    level: list[tuple[JSON, tuple[str | int, ...]]] = []
    if isinstance(document, _CONTAINERS):
        level.append((document, ()))
    for _ in range(MAX_DEPTH):
        below: list[tuple[JSON, tuple[str | int, ...]]] = []
        for value, path in level:
            members = value.items() if isinstance(value, dict) else enumerate(value)
            below.extend((m, (*path, n)) for n, m in members if isinstance(m, _CONTAINERS))
        if not below:
            return []
        level = below
    return sorted(FieldError(json_pointer(path), TOO_DEEP_MESSAGE) for _value, path in level)


def _encodes(document: JSON) -> bool:
    try:
        json.dumps(document, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
        return False
    return True


def _unservable_values(document: JSON) -> list[FieldError]:
    # The slow walk that finds what `_encodes` refused; the nesting is already within limits.
    errors: list[FieldError] = []
    stack: list[tuple[JSON, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _CONTAINERS):
            members = value.items() if isinstance(value, dict) else enumerate(value)
            for name, member in members:
                if isinstance(name, str) and _has_surrogate(name):
                    errors.append(FieldError(json_pointer((*path, name)), SURROGATE_NAME_MESSAGE))
                stack.append((member, (*path, name)))
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(FieldError(json_pointer(path), NOT_FINITE_MESSAGE))
        elif isinstance(value, str) and _has_surrogate(value):
            errors.append(FieldError(json_pointer(path), SURROGATE_MESSAGE))
    return sorted(errors)


def safe_form(value: JSON, depth: int = 1) -> JSON:
    """`value` with everything JSON cannot carry replaced, for records stored before the checks.

    Non-finite numbers (and anything that is not a JSON value) become `null`, each lone
    surrogate in text or in a member name becomes U+FFFD, and a container nested deeper than
    MAX_DEPTH becomes `null`. Everything else is kept as it is.
    """
    if isinstance(value, dict | list | tuple) and depth > MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {
            _SURROGATE.sub("\ufffd", str(name)): safe_form(member, depth + 1)
            for name, member in value.items()
        }
    if isinstance(value, list | tuple):
        return [safe_form(member, depth + 1) for member in value]
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        try:
            str(value)  # more digits than Python will print: the encoder would fail too
        except ValueError:
            return None
        return value
    return None


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
        """Every reason `document` is not acceptable as a client's device, sorted by path.

        A document nested too deeply gets only its nesting errors: the schema's messages
        quote values, and quoting one that deep could exhaust the stack.
        """
        found = value_errors(document)
        if any(error.message == TOO_DEEP_MESSAGE for error in found):
            return found
        found.extend(_error_to_field(e) for e in self._input.iter_errors(document))
        return sorted(set(found))

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
