"""Reading routes.yaml: YAML text to plain data, with the position of every node.

The file is composed (not just loaded) so that every value and every mapping key keeps its
line and column; `${VAR}` and `${VAR:-default}` are expanded in string values here, before
validation. A problem found while reading is a `ConfigError` value, never an exception.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

JSON = Any  # data that came from YAML or JSON; narrowed in compile.py
PathKey = tuple[str | int, ...]

_VAR: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SCALAR_TAGS: Final = {
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
}


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem in a config file, printed as `FILE:LINE:COL: dotted.path: message`."""

    file: str
    line: int
    col: int
    path: str  # dotted: routes.1.prefix ("" is the document root)
    message: str
    warning: bool = False  # a warning is printed but does not reject the file

    def __str__(self) -> str:
        kind = "warning: " if self.warning else ""
        return f"{self.file}:{self.line}:{self.col}: {self.path or '<root>'}: {kind}{self.message}"


def dotted(path: PathKey) -> str:
    return ".".join(str(part) for part in path)


@dataclass(slots=True)
class Document:
    """A parsed config file: its data, where each node stands, and what came from ${VAR}."""

    file: str
    text: str
    data: JSON
    positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)  # 1-based
    key_positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    expanded: set[PathKey] = field(default_factory=set)  # values that hold an env value
    unresolved: set[PathKey] = field(default_factory=set)  # a ${VAR} there was not set
    errors: list[ConfigError] = field(default_factory=list)
    raw: bytes | None = None  # the file's bytes, when it came from a file

    @property
    def version_hash(self) -> str:
        """sha256 of the file's bytes (of the text's UTF-8 when there is no file)."""
        return file_hash(self.raw if self.raw is not None else self.text.encode())

    def where(self, path: PathKey, *, key: bool = False) -> tuple[int, int]:
        """The position of `path`, or of its nearest ancestor that has one."""
        if key and path in self.key_positions:
            return self.key_positions[path]
        probe = path
        while probe not in self.positions and probe:
            probe = probe[:-1]
        return self.positions.get(probe, (1, 1))

    def error(
        self, path: PathKey, message: str, *, key: bool = False, warning: bool = False
    ) -> None:
        line, col = self.where(path, key=key)
        self.errors.append(ConfigError(self.file, line, col, dotted(path), message, warning))


def read_file(path: str | Path, environ: Mapping[str, str] | None = None) -> Document:
    """Read and parse a config file; an unreadable file is a ConfigError at 1:1."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        doc = Document(name, "", None)
        reason = exc.strerror if isinstance(exc, OSError) else None
        doc.error((), f"cannot read file: {reason or type(exc).__name__}")
        return doc
    doc = parse_text(text.replace("\r\n", "\n"), name, environ)
    doc.raw = raw
    return doc


def file_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_text(
    text: str, file: str = "<string>", environ: Mapping[str, str] | None = None
) -> Document:
    doc = Document(file, text, None)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        doc.errors.append(ConfigError(file, line, col, "", f"invalid YAML: {exc.problem}"))
        return doc
    except yaml.YAMLError as exc:
        doc.errors.append(ConfigError(file, 1, 1, "", f"invalid YAML: {exc}"))
        return doc
    if node is None:
        doc.error((), "the file is empty")
        return doc
    doc.data = _Walker(doc, os.environ if environ is None else environ).walk(node, ())
    return doc


class _Walker:
    """Turns composed YAML nodes into data, recording positions and expanding ${VAR}."""

    def __init__(self, doc: Document, environ: Mapping[str, str]) -> None:
        self.doc = doc
        self.environ = environ
        self.loader = yaml.SafeLoader("")
        self.resolver = yaml.resolver.Resolver()

    def walk(self, node: yaml.Node, path: PathKey) -> JSON:
        self.doc.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[str, JSON]:
        result: dict[str, JSON] = {}
        for key_node, value_node in node.value:
            key = str(self.loader.construct_object(key_node))
            child = (*path, key)
            where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in result:
                self.doc.errors.append(
                    ConfigError(self.doc.file, *where, dotted(child), f"duplicate key {key!r}")
                )
                continue
            self.doc.key_positions[child] = where
            result[key] = self.walk(value_node, child)
        return result

    def _scalar(self, node: yaml.ScalarNode, path: PathKey) -> JSON:
        value = self.loader.construct_object(node)
        if not isinstance(value, str) or "${" not in value:
            return value
        expanded = self._expand(value, path)
        self.doc.expanded.add(path)
        if node.style is None:  # a plain scalar may expand to a number or a boolean
            tag = self.resolver.resolve(  # type: ignore[no-untyped-call]  # untyped in stubs
                yaml.ScalarNode, expanded, (True, False)
            )
            if tag in _SCALAR_TAGS:
                return yaml.safe_load(expanded)
        return expanded

    def _expand(self, value: str, path: PathKey) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.environ:
                return self.environ[name]
            if default is not None:
                return default
            self.doc.error(path, f"environment variable {name} is not set and has no default")
            self.doc.unresolved.add(path)
            return ""

        return _VAR.sub(replace, value)
