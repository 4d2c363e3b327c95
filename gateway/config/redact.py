"""The config text the admin listener shows, with secret values replaced by `<redacted>`.

`/config` and the dashboard show routes.yaml as written (`${VAR}` stays unexpanded, so an
expanded value never appears). What the file itself holds can still be secret: the value of
every `secret`, `key_sha256` and `token_sha256` key (an API-key hash is enough to try keys
offline) and the password in a URL's `user:password@`. Each such value becomes `<redacted>`,
and line numbers are kept, so a `FILE:LINE:COL` error still points at the right line.

The YAML is composed to find each value's exact span (block scalars and anchors included);
text that does not parse (a rejected reload) is redacted line by line instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

import yaml

from gateway.config.read import ConfigError

REDACTED: Final = "<redacted>"
SECRET_KEYS: Final = frozenset({"secret", "key_sha256", "token_sha256"})
_URL_PASSWORD: Final = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*:)[^\s/@]+@")
_SECRET_LINE: Final = re.compile(
    r"""(?P<key>(?:^|[\s{,?-])["']?(?:secret|key_sha256|token_sha256)["']?\s*:[ \t]*)"""
    r"""(?P<value>"[^"\n]*"?|'[^'\n]*'?|[^\s,}\]#][^,}\]#\n]*)"""
)


def redact(text: str) -> str:
    """`text` with every secret value replaced; the same number of lines."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return redact_lines(text)
    spans: list[tuple[int, int]] = []
    if root is not None:
        _collect(root, spans, set())
    out, at = [], 0
    for start, end in sorted(set(spans)):
        if start < at:
            continue  # inside a span already replaced
        out.append(text[at:start])
        out.append(REDACTED + "\n" * text.count("\n", start, end))
        at = end
    out.append(text[at:])
    return _URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", "".join(out))


def redact_lines(text: str) -> str:
    """Line by line, for text that is not valid YAML: `secret: VALUE` (quoted, plain, in a
    flow mapping, or a `|`/`>` block: its more indented lines too) and URL passwords."""
    out, block = [], -1  # block: the indent of a secret key whose block scalar follows
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip(" "))
        if block >= 0 and (indent > block or not line.strip()):
            out.append(line[:indent] + REDACTED if line.strip() else line)
            continue
        block = -1
        match = _SECRET_LINE.search(line)
        if match is not None and match["value"][:1] in ("|", ">"):
            block = indent
        out.append(_SECRET_LINE.sub(lambda m: f"{m['key']}{REDACTED}", line))
    return _URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", "\n".join(out))


def _collect(node: yaml.Node, spans: list[tuple[int, int]], seen: set[int]) -> None:
    """The (start, end) character offsets of every value under a secret key."""
    if id(node) in seen:  # an alias: the same node again
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value in SECRET_KEYS:
                _spans_of(value, spans)
            else:
                _collect(key, spans, seen)
                _collect(value, spans, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _collect(item, spans, seen)


def _spans_of(node: yaml.Node, spans: list[tuple[int, int]]) -> None:
    """Every scalar under a secret key (a list or mapping of secrets too). For an alias the
    marks are the anchor's, so the value is redacted where it is written."""
    if isinstance(node, yaml.ScalarNode):
        spans.append((node.start_mark.index, node.end_mark.index))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _spans_of(item, spans)
    elif isinstance(node, yaml.MappingNode):
        for _, value in node.value:
            _spans_of(value, spans)


def line_of(text: str, line: int) -> str:
    """Line `line` (1-based) of `text`, or "" past its end."""
    lines = text.split("\n")
    return lines[line - 1] if 0 < line <= len(lines) else ""


def quote_errors(text: str, errors: Iterable[ConfigError]) -> list[dict[str, object]]:
    """Each error with its position and the redacted text of its line, for /config."""
    shown = redact(text)
    return [
        {
            "file": e.file,
            "line": e.line,
            "col": e.col,
            "path": e.path,
            "message": e.message,
            "text": line_of(shown, e.line),
        }
        for e in errors
    ]
