"""Every check of a routes.yaml document: JSON Schema for its shape, then Python for relations.

Both kinds of check append `ConfigError` values to the document; nothing stops at the first
problem. Messages never quote a value that came from an environment variable.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from ipaddress import ip_network
from pathlib import Path
from typing import Final

import jsonschema
from yarl import URL

from gateway.config.handlers import load_handler
from gateway.config.jwtkeys import ALGORITHM_KEYS, HMAC_MIN_BYTES, public_key_problem
from gateway.config.model import ALL_METHODS, ListenerTls
from gateway.config.read import JSON, Document, PathKey
from gateway.config.redisurl import redis_url_problem
from gateway.config.templates import parse_template
from gateway.config.tls import ca_problem, file_problem, listener_problem

SOURCE_SCHEMAS: Final = Path(__file__).resolve().parents[2] / "schemas"  # the repository's


def schema_file(name: str) -> Traversable:
    """A schema from the top-level `schemas/`: the copy a built wheel carries inside the package
    (setup.py puts it there), else the repository's own file (source checkout, editable install)."""
    packaged = resources.files("gateway") / "_schemas" / name
    return packaged if packaged.is_file() else SOURCE_SCHEMAS / name


SCHEMA_PATH: Final = schema_file("routes.schema.json")
SUPPORTED_VERSION: Final = 1

_PATTERN_MESSAGES: Final = {
    "^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$": "must be package.module:function",
    "^(?=[0-9.]*[1-9])[0-9]+(\\.[0-9]+)?(ms|s|m|h)$": (
        "must be a duration above zero, such as 250ms, 5s, 1m or 1h"
    ),
    "^/": "must start with '/'",
    "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$": "is not a valid HTTP header name",
    "^[A-Za-z][A-Za-z0-9_-]{0,62}$": "must be a letter then letters, digits, _ or -",
    "^[0-9a-f]{64}$": "must be 64 lowercase hex digits (a SHA-256)",
    "^[!#-\\[\\]-~]{1,256}$": "must be a scope name: visible ASCII, no space, quote or backslash",
    "^(ip|consumer|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$": "must be ip, consumer or header:NAME",
    "^(consumer|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$": "must be consumer or header:NAME",
}
_TYPE_NAMES: Final = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "empty",
}


@cache
def schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate(doc: Document) -> None:
    """Append every schema and semantic error of `doc` to `doc.errors`."""
    if doc.data is None:
        return
    if not isinstance(doc.data, dict):
        doc.error((), "the file must be a mapping with version, services and routes")
        return
    version = doc.data.get("version")
    if version != SUPPORTED_VERSION:
        if version is None:
            shown = "missing"
        elif ("version",) in doc.expanded:  # never echo a value from the environment
            shown = "from the environment is not supported"
        else:
            shown = f"{version!r} is not supported"
        doc.error(("version",), f"version {shown}: this gateway reads version {SUPPORTED_VERSION}")
        return
    for error in schema_validator().iter_errors(doc.data):
        _report(doc, error)
    _check_semantics(doc, doc.data)


def _report(doc: Document, error: jsonschema.ValidationError) -> None:
    path: PathKey = tuple(error.absolute_path)
    if path == ("version",) or path in doc.unresolved:
        return  # checked first, or already reported as an unset variable
    schema: JSON = error.schema
    rule: JSON = error.validator_value
    instance: JSON = error.instance
    if "propertyNames" in error.schema_path:  # a bad key: point at the key, and name it
        key = str(instance)
        doc.error((*path, key), f"name {key!r} {_message(error)}", key=True)
        return
    match error.validator:
        case "additionalProperties":
            allowed = list(schema.get("properties", {}))
            for key in _extra_keys(error.instance, allowed):
                doc.error((*path, key), f"unknown key {key!r}{_suggest(key, allowed)}", key=True)
        case "required":
            missing = [k for k in rule if k not in instance]
            for key in missing:
                doc.error(path, f"missing required key {key!r}")
        case "oneOf" | "anyOf":
            _report_alternatives(doc, error, path)
        case _:
            doc.error(path, _message(error, expanded=path in doc.expanded))


def _report_alternatives(doc: Document, error: jsonschema.ValidationError, path: PathKey) -> None:
    """For `target: str | {url, weight}`, report the branch the value was trying to be."""
    same_type = [e for e in error.context or () if e.validator != "type" and e.schema_path[0] == 1]
    if isinstance(error.instance, dict) and same_type:
        for sub in same_type:
            _report(doc, sub)
        return
    doc.error(path, "must be a URL string or a mapping {url, weight}")


def _extra_keys(instance: JSON, allowed: Iterable[str]) -> list[str]:
    known = set(allowed)
    return [k for k in instance if k not in known] if isinstance(instance, dict) else []


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _message(error: jsonschema.ValidationError, *, expanded: bool = False) -> str:
    value: JSON = error.validator_value
    match error.validator:
        case "type":
            names: list[str] = value if isinstance(value, list) else [value]
            return "must be " + " or ".join(_TYPE_NAMES.get(n, n) for n in names)
        case "enum":
            return "must be one of: " + ", ".join(str(v) for v in value)
        case "const":
            return f"must be {value!r}"
        case "pattern":
            return _PATTERN_MESSAGES.get(value, f"must match {value}")
        case "minimum":
            return f"must be at least {value}"
        case "maximum":
            return f"must be at most {value}"
        case "minLength":
            return "must not be empty"
        case "minItems":
            return f"must have at least {value} item{'s' if value != 1 else ''}"
        case "minProperties":
            return f"must have at least {value} entr{'ies' if value != 1 else 'y'}"
        case "uniqueItems":
            return "must not list an item twice"
    return "is invalid" if expanded else error.message


# --- semantic checks: relations the schema cannot express --------------------------------


def _check_semantics(doc: Document, data: dict[str, JSON]) -> None:
    services = data.get("services")
    service_names = list(services) if isinstance(services, dict) else []
    for key in ("listen", "admin"):
        if isinstance(data.get(key), str):
            _check_hostport(doc, (key,), data[key])
    if data.get("listen") is not None and data.get("listen") == data.get("admin"):
        doc.error(("admin",), "must differ from listen: the admin API is never public")
    for i, cidr in enumerate(data.get("trusted_proxies") or ()):
        _check_cidr(doc, ("trusted_proxies", i), cidr)
    redis = (data.get("store") or {}).get("redis") if isinstance(data.get("store"), dict) else None
    if isinstance(redis, str) and redis:
        problem = redis_url_problem(redis)
        if problem:
            doc.error(("store", "redis"), problem)
    tracing = data.get("tracing")
    if isinstance(tracing, dict) and isinstance(tracing.get("otlp_endpoint"), str):
        problem = target_url_problem(tracing["otlp_endpoint"])
        if problem:
            doc.error(("tracing", "otlp_endpoint"), problem.replace("target URL", "OTLP URL"))
    if isinstance(services, dict):
        for name, service in services.items():
            if isinstance(service, dict):
                _check_service(doc, ("services", name), service)
    if isinstance(data.get("auth"), dict):
        _check_auth(doc, data["auth"])
    auth = data.get("auth")
    if isinstance(auth, dict) and isinstance(auth.get("forward"), dict):
        where = ("auth", "forward", "service")
        _check_service_name(doc, where, auth["forward"].get("service"), service_names)
    if isinstance(data.get("tls"), dict):
        _check_listener_tls(doc, data["tls"])
    required = data.get("admin_ready_requires")
    for i, name in enumerate(required if isinstance(required, list) else ()):
        _check_service_name(doc, ("admin_ready_requires", i), name, service_names)
    routes = data.get("routes")
    if isinstance(routes, list):
        _check_routes(doc, routes, service_names)


def _check_hostport(doc: Document, path: PathKey, value: str) -> None:
    port = value.rpartition(":")[2]
    if port.isdigit() and not 0 < int(port) < 65536:
        doc.error(path, "port must be between 1 and 65535")


def _check_cidr(doc: Document, path: PathKey, value: JSON) -> None:
    if not isinstance(value, str):
        return
    try:
        ip_network(value, strict=False)
    except ValueError:
        doc.error(path, "must be an IP network such as 10.0.0.0/8 or ::1/128")


def _check_listener_tls(doc: Document, tls: dict[str, JSON]) -> None:
    files = [(key, tls.get(key)) for key in ("cert_file", "key_file")]
    found = True
    for key, file in files:
        problem = file_problem(file) if isinstance(file, str) else None
        if problem:
            doc.error(("tls", key), problem)
        found = found and problem is None and isinstance(file, str)
    if found:
        problem = listener_problem(ListenerTls(tls["cert_file"], tls["key_file"]))
        if problem:
            doc.error(("tls", "cert_file"), problem)


def _check_service_tls(doc: Document, path: PathKey, tls: dict[str, JSON]) -> None:
    ca_file = tls.get("ca_file")
    if isinstance(ca_file, str):
        problem = file_problem(ca_file) or ca_problem(ca_file)
        if problem:
            doc.error((*path, "ca_file"), problem)
    if tls.get("verify") is False:
        message = "the certificates of this service's https targets are not checked"
        doc.error((*path, "verify"), message, warning=True)


def _check_service(doc: Document, path: PathKey, service: dict[str, JSON]) -> None:
    if isinstance(service.get("tls"), dict):
        _check_service_tls(doc, (*path, "tls"), service["tls"])
    for i, target in enumerate(service.get("targets") or ()):
        url = target.get("url") if isinstance(target, dict) else target
        where = (*path, "targets", i, "url") if isinstance(target, dict) else (*path, "targets", i)
        if isinstance(url, str):
            problem = target_url_problem(url)
            if problem:
                doc.error(where, problem)


def target_url_problem(url: str) -> str | None:
    """Why `url` cannot be a target, or None. Never quotes the URL (it may hold a secret)."""
    try:
        parsed = URL(url)
    except ValueError:
        return "bad target URL: cannot be parsed"
    if parsed.scheme not in ("http", "https"):
        return "bad target URL: the scheme must be http or https"
    if not parsed.host:
        return "bad target URL: it names no host"
    if parsed.query_string or parsed.fragment:
        return "bad target URL: it must not have a query or a fragment"
    if parsed.user or parsed.password:
        return "bad target URL: credentials in the URL are not supported"
    try:
        parsed.port  # noqa: B018 - raises on an out-of-range port
    except ValueError:
        return "bad target URL: invalid port"
    return None


def _check_service_name(doc: Document, path: PathKey, name: JSON, service_names: list[str]) -> None:
    if not isinstance(name, str) or name in service_names:
        return
    if path in doc.expanded:  # never echo a value from the environment
        doc.error(path, "unknown service (the value from the environment)")
    else:
        doc.error(path, f"unknown service {name!r}{_suggest(name, service_names)}")


ACTIONS: Final = ("service", "aggregate", "compose")  # a route has exactly one of these


def _check_action(doc: Document, path: PathKey, route: dict[str, JSON]) -> None:
    """Exactly one action per route (CONTRACT §11): none, or two, is an error at the route
    (none) or at the second action's key (two)."""
    named = [key for key in ACTIONS if key in route]
    if not named:
        doc.error(path, "a route needs one action: service, aggregate or compose")
    for extra in named[1:]:
        doc.error(
            (*path, extra),
            f"a route has one action: {named[0]!r} and {extra!r} cannot both be set",
            key=True,
        )


def _check_routes(doc: Document, routes: list[JSON], service_names: list[str]) -> None:
    seen: dict[str, list[tuple[int, frozenset[str]]]] = {}
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        path: PathKey = ("routes", i)
        _check_action(doc, path, route)
        service = route.get("service")
        if isinstance(service, str):
            _check_service_name(doc, (*path, "service"), service, service_names)
        if isinstance(route.get("prefix"), str):
            _check_prefix(doc, path, route, seen)
        for rules in ("request_headers", "response_headers"):
            if isinstance(route.get(rules), dict):
                _check_header_rules(doc, (*path, rules), route[rules])
        if isinstance(route.get("cors"), dict):
            _check_cors(doc, (*path, "cors"), route["cors"])
        if isinstance(route.get("auth"), dict):
            _check_route_auth(doc, (*path, "auth"), route["auth"])
        if isinstance(route.get("cache"), dict):
            _check_cache(doc, (*path, "cache"), route)
        if isinstance(route.get("aggregate"), dict):
            _check_aggregate(doc, (*path, "aggregate"), route["aggregate"], service_names)
        compose = route.get("compose")
        handler = compose.get("handler") if isinstance(compose, dict) else None
        if isinstance(handler, str) and HANDLER_NAME.fullmatch(handler) and "service" not in route:
            _, problem = load_handler(handler, doc.file)
            if problem:
                doc.error((*path, "compose", "handler"), problem)


def _check_cache(doc: Document, path: PathKey, route: dict[str, JSON]) -> None:
    key_by = route["cache"].get("key_by")
    if isinstance(key_by, list) and "consumer" in key_by and not route.get("auth"):
        i = key_by.index("consumer")
        doc.error((*path, "key_by", i), "keying by consumer needs auth on this route")


HANDLER_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*")
RESERVED_PARTS: Final = frozenset({"partial"})  # the answer's own member


def _check_aggregate(
    doc: Document, path: PathKey, parts: dict[str, JSON], service_names: list[str]
) -> None:
    for name, part in parts.items():
        if name in RESERVED_PARTS:
            doc.error((*path, name), f"{name!r} names the answer's list of failed parts", key=True)
        if not isinstance(part, dict):
            continue
        _check_service_name(doc, (*path, name, "service"), part.get("service"), service_names)
        if isinstance(part.get("path"), str):
            template = parse_template(part["path"])
            if isinstance(template, str):
                doc.error((*path, name, "path"), template)


_ORIGIN: Final = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s@]+")


def _check_cors(doc: Document, path: PathKey, cors: dict[str, JSON]) -> None:
    origins = cors.get("origins")
    for i, origin in enumerate(origins if isinstance(origins, list) else ()):
        if not isinstance(origin, str):
            continue
        if origin == "*":
            if cors.get("credentials") is True:
                message = "credentials: true needs explicit origins; '*' is never sent with them"
                doc.error((*path, "origins", i), message)
        elif origin != "null" and not _ORIGIN.fullmatch(origin.lower()):
            doc.error(
                (*path, "origins", i),
                "must be '*' or an origin: scheme://host[:port], without a path",
            )


# --- auth: keys that fit their algorithms, methods that exist -----------------------------

AUTH_SECTIONS: Final = {"jwt": "jwt", "api_key": "api_keys", "forward": "forward"}


def _check_auth(doc: Document, auth: dict[str, JSON]) -> None:
    if isinstance(auth.get("jwt"), dict):
        _check_jwt(doc, ("auth", "jwt"), auth["jwt"])
    seen: dict[str, int] = {}
    for i, entry in enumerate(auth.get("api_keys") or ()):
        digest = entry.get("key_sha256") if isinstance(entry, dict) else None
        if isinstance(digest, str) and digest in seen:
            where = ("auth", "api_keys", i, "key_sha256")
            doc.error(where, f"the same key is listed at auth.api_keys.{seen[digest]}")
        elif isinstance(digest, str):
            seen[digest] = i


def _check_jwt(doc: Document, path: PathKey, jwt: dict[str, JSON]) -> None:
    sources = [k for k in ("secret", "public_key_file", "jwks_url") if k in jwt]
    if len(sources) != 1:
        doc.error(path, "give exactly one key: secret, public_key_file or jwks_url")
        return
    algorithms = jwt.get("algorithms")
    algs = (
        frozenset(a for a in algorithms if a in ALGORITHM_KEYS)
        if isinstance(algorithms, list)
        else frozenset()
    )
    value, where = jwt[sources[0]], (*path, sources[0])
    if not isinstance(value, str) or not algs:
        return
    hmac = sorted(a for a in algs if ALGORITHM_KEYS[a] == "hmac")
    if sources[0] != "secret" and hmac:
        doc.error(
            (*path, "algorithms"),
            f"{', '.join(hmac)} need a secret; {sources[0]} holds public keys",
        )
        return
    match sources[0]:
        case "secret":
            _check_secret(doc, where, value, algs, hmac)
        case "public_key_file":
            try:
                pem = key_file(doc.file, value).read_bytes()
            except OSError as exc:
                doc.error(
                    where, f"cannot read public_key_file: {exc.strerror or type(exc).__name__}"
                )
                return
            problem = public_key_problem(pem, algs)
            if problem:
                doc.error(where, problem)
        case _:
            problem = target_url_problem(value)
            if problem:
                doc.error(where, problem.replace("target URL", "jwks_url"))


def _check_secret(
    doc: Document, path: PathKey, secret: str, algs: frozenset[str], hmac: list[str]
) -> None:
    """Never quotes the secret, nor says how long it is."""
    if path not in doc.expanded:
        doc.error(path, "write the secret as ${VAR}: a secret in the file would show in /config")
    others = sorted(algs - set(hmac))
    if others:
        doc.error(
            path, f"a secret cannot verify {', '.join(others)}: use public_key_file or jwks_url"
        )
    need = max((HMAC_MIN_BYTES[a], a) for a in hmac) if hmac else None
    if need is not None and len(secret.encode()) < need[0]:
        doc.error(
            path,
            f"the secret is shorter than {need[0]} bytes, the least {need[1]} allows (RFC 7518)",
        )


def key_file(config_file: str, name: str) -> Path:
    """A key file named in the config: relative names are relative to the config's folder."""
    path = Path(name)
    return (
        path
        if path.is_absolute() or config_file.startswith("<")
        else Path(config_file).parent / path
    )


def _check_route_auth(doc: Document, path: PathKey, auth: dict[str, JSON]) -> None:
    methods = auth.get("any_of")
    if methods is None:
        doc.error(path, "auth needs any_of: scopes and consumers mean nothing without a method")
        return
    configured = doc.data.get("auth") if isinstance(doc.data.get("auth"), dict) else {}
    for i, method in enumerate(methods if isinstance(methods, list) else ()):
        section = AUTH_SECTIONS.get(method) if isinstance(method, str) else None
        if section is not None and section not in configured:
            doc.error(
                (*path, "any_of", i),
                f"{method} is not configured: add auth.{section} at the top level",
            )


# Headers that frame the message or belong to one connection: a rule that set or removed them
# would corrupt the wire format (a body with two lengths, a response with none).
UNTOUCHABLE_HEADERS: Final = frozenset(
    {"content-length", "transfer-encoding", "host", "connection", "keep-alive", "te",
     "trailer", "upgrade", "proxy-connection", "proxy-authenticate", "proxy-authorization"}
)  # fmt: skip


# RFC 9110 §5.5: a field value holds no control character but HTAB (obs-text is allowed).
FIELD_VALUE_FORBIDDEN: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _check_header_rules(doc: Document, path: PathKey, rules: dict[str, JSON]) -> None:
    names: list[tuple[PathKey, str]] = []
    if isinstance(rules.get("set"), dict):
        names += [((*path, "set", name), name) for name in rules["set"]]
        for name, value in rules["set"].items():
            if isinstance(value, str):
                _check_header_value(doc, (*path, "set", name), value)
    if isinstance(rules.get("remove"), list):
        names += [((*path, "remove", i), n) for i, n in enumerate(rules["remove"])]
    for where, name in names:
        if isinstance(name, str) and name.lower() in UNTOUCHABLE_HEADERS:
            message = f"{name} frames the message or belongs to one hop; it cannot be changed"
            doc.error(where, message, key=where[-2] == "set")


def _check_header_value(doc: Document, path: PathKey, value: str) -> None:
    found = FIELD_VALUE_FORBIDDEN.search(value)
    if found is None:
        return
    char = found.group()
    what = {"\r": "a line break (CR)", "\n": "a line break (LF)", "\0": "a NUL character"}.get(
        char, f"the control character U+{ord(char):04X}"
    )
    source = "the value from the environment" if path in doc.expanded else "the value"
    doc.error(path, f"{source} holds {what}; a header value may hold no control character but tab")


def _check_prefix(
    doc: Document,
    path: PathKey,
    route: dict[str, JSON],
    seen: dict[str, list[tuple[int, frozenset[str]]]],
) -> None:
    prefix = route["prefix"]
    normal = normalize_prefix(prefix)
    segments = prefix.split("/")
    if any(s in (".", "..") for s in segments) or any(c in prefix for c in "?#%\\"):
        doc.error((*path, "prefix"), "must be a plain path: no '.', '..', '%', '?', '#' or '\\'")
        return
    methods = route_methods(route.get("methods"))
    for other, other_methods in seen.get(normal, []):
        overlap = methods & other_methods
        if not overlap:
            continue  # same prefix, disjoint methods: the routes split the path by method
        shown = ", ".join(sorted(overlap))
        if overlap == methods:
            doc.error((*path, "prefix"), f"duplicate prefix: routes.{other} already serves it")
        else:
            doc.error(
                (*path, "prefix"),
                f"shadowed by routes.{other} (same prefix) for {shown}; this route never gets them",
                warning=True,
            )
    index = path[1]
    assert isinstance(index, int)
    seen.setdefault(normal, []).append((index, methods))


def normalize_prefix(prefix: str) -> str:
    """'/api//inventory/' -> '/api/inventory'; '/' stays '/'."""
    return "/" + "/".join(s for s in prefix.split("/") if s)


def route_methods(methods: JSON) -> frozenset[str]:
    if not isinstance(methods, list):
        return ALL_METHODS
    names = frozenset(str(m) for m in methods)
    return names | {"HEAD"} if "GET" in names else names


def parse_duration(text: str) -> float:
    """'250ms' -> 0.25, '5s' -> 5.0, '1m' -> 60.0, '1h' -> 3600.0 (text already validated)."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    raise ValueError(text)
