"""routes.yaml loading: every error reported with FILE:LINE:COL, env expansion, --check."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.__main__ import main
from gateway.config.build import load_text
from gateway.config.model import DnsDiscoveryConfig

HEAD = "version: 1\nservices:\n  inventory: {targets: [http://127.0.0.1:8001]}\nroutes:\n"
ROUTE = "  - prefix: /api/inventory\n    service: inventory\n"

CASES = [
    (
        "unknown_key_points_at_the_key",
        HEAD + ROUTE + "    strip_prefx: true\n",
        [
            "routes.yaml:7:5: routes.0.strip_prefx: unknown key 'strip_prefx'; did you mean 'strip_prefix'?"
        ],
    ),
    (
        "unknown_service_suggests_a_close_name",
        HEAD + "  - prefix: /a\n    service: inventroy\n",
        [
            "routes.yaml:6:14: routes.0.service: unknown service 'inventroy'; did you mean 'inventory'?"
        ],
    ),
    (
        "bad_duration",
        "version: 1\nservices:\n  s:\n    targets: [http://h:1]\n    timeouts: {read: 5 seconds}\n"
        "routes:\n  - {prefix: /, service: s}\n",
        [
            "routes.yaml:5:22: services.s.timeouts.read: must be a duration above zero, such as 250ms, 5s, 1m or 1h"
        ],
    ),
    (
        "bad_target_url",
        "version: 1\nservices:\n  s:\n    targets: [ftp://h:1]\nroutes:\n  - {prefix: /, service: s}\n",
        [
            "routes.yaml:4:15: services.s.targets.0: bad target URL: the scheme must be http or https"
        ],
    ),
    (
        "duplicate_prefix",
        HEAD + ROUTE + ROUTE,
        ["routes.yaml:7:13: routes.1.prefix: duplicate prefix: routes.0 already serves it"],
    ),
    (
        "missing_required_key",
        "version: 1\nservices:\n  s: {balance: least_conn}\nroutes:\n  - {prefix: /, service: s}\n",
        ["routes.yaml:3:6: services.s: missing required key 'targets'"],
    ),
    (
        "wrong_type_and_enum_both_reported",
        "version: 1\nservices:\n  s: {targets: [http://h:1], retries: many, balance: random}\n"
        "routes:\n  - {prefix: /, service: s}\n",
        [
            "routes.yaml:3:39: services.s.retries: must be an integer",
            "routes.yaml:3:54: services.s.balance: must be one of: round_robin, least_conn",
        ],
    ),
    (
        "aggregate_part_names_a_known_service",
        HEAD + "  - prefix: /a\n    aggregate: {a: {service: inventroy, path: /a}}\n",
        [
            "routes.yaml:6:30: routes.0.aggregate.a.service: unknown service 'inventroy'; did you mean 'inventory'?"
        ],
    ),
    (
        "cache_key_by_consumer_needs_auth",
        HEAD + ROUTE + "    cache: {ttl: 30s, key_by: [header:X-Tenant, consumer]}\n",
        ["routes.yaml:7:49: routes.0.cache.key_by.1: keying by consumer needs auth on this route"],
    ),
    (
        "cache_key_by_is_consumer_or_header",
        HEAD + ROUTE + "    cache: {ttl: 30s, key_by: [ip]}\n",
        ["routes.yaml:7:32: routes.0.cache.key_by.0: must be consumer or header:NAME"],
    ),
    (
        "zero_duration",
        HEAD + ROUTE + "    timeouts: {read: 0s}\n",
        [
            "routes.yaml:7:22: routes.0.timeouts.read: must be a duration above zero, such as 250ms, 5s, 1m or 1h"
        ],
    ),
    (
        "bad_service_name_points_at_the_name",
        "version: 1\nservices:\n  ok: {targets: [http://h:1]}\n  2bad: {targets: [http://h:1]}\n"
        "routes:\n  - {prefix: /, service: ok}\n",
        [
            "routes.yaml:4:3: services.2bad: name '2bad' must be a letter then letters, digits, _ or -"
        ],
    ),
    (
        "wrong_version",
        "version: 2\nservices: {}\nroutes: []\n",
        ["routes.yaml:1:10: version: version 2 is not supported: this gateway reads version 1"],
    ),
    (
        "invalid_yaml",
        "version: 1\nservices: [\n",
        [
            "routes.yaml:3:1: <root>: invalid YAML: expected the node content, but found '<stream end>'"
        ],
    ),
    (
        "missing_env_var",
        HEAD + "  - prefix: ${NOT_SET_ANYWHERE}\n    service: inventory\n",
        [
            "routes.yaml:5:13: routes.0.prefix: environment variable NOT_SET_ANYWHERE is not set and"
            " has no default"
        ],
    ),
    (
        "duplicate_yaml_key",
        HEAD + ROUTE + "    service: inventory\n",
        ["routes.yaml:7:5: routes.0.service: duplicate key 'service'"],
    ),
    (
        "prefix_with_dot_segments",
        HEAD + "  - prefix: /a/../b\n    service: inventory\n",
        [
            "routes.yaml:5:13: routes.0.prefix: must be a plain path: no '.', '..', '%', '?', '#' or '\\'"
        ],
    ),
    (
        "discovery_unknown_key",
        "version: 1\nservices:\n  s:\n    targets: [http://h:1]\n    discovery: {dns: {every: 5s}}\n"
        "routes:\n  - {prefix: /, service: s}\n",
        ["routes.yaml:5:23: services.s.discovery.dns.every: unknown key 'every'"],
    ),
    (
        "admin_equal_to_listen",
        "version: 1\nlisten: 0.0.0.0:80\nadmin: 0.0.0.0:80\n" + HEAD[11:] + ROUTE,
        ["routes.yaml:3:8: admin: must differ from listen: the admin API is never public"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_errors_name_file_line_and_column(text: str, expected: list[str]) -> None:
    result = load_text(text, "routes.yaml", environ={})

    assert [str(e) for e in result.errors] == expected
    assert result.config is None


def test_every_error_is_reported_not_just_the_first() -> None:
    text = HEAD + "  - prefix: /a\n    service: nope\n    bogus: 1\n  - prefix: b\n    service: x\n"

    result = load_text(text, "routes.yaml", environ={})

    assert len(result.errors) == 4


def test_shadowed_methods_are_a_warning_not_an_error() -> None:
    text = HEAD + ROUTE + "    methods: [GET, POST]\n" + ROUTE + "    methods: [GET, PUT]\n"

    result = load_text(text, "routes.yaml", environ={})

    assert result.config is not None
    assert [str(w) for w in result.warnings] == [
        "routes.yaml:8:13: routes.1.prefix: warning: shadowed by routes.0 (same prefix) for GET, "
        "HEAD; this route never gets them"
    ]


def test_same_prefix_with_disjoint_methods_splits_by_method() -> None:
    text = HEAD + ROUTE + "    methods: [GET]\n" + ROUTE + "    methods: [POST]\n"

    result = load_text(text, "routes.yaml", environ={})

    assert result.problems == []


def test_env_values_expand_with_defaults_and_become_numbers_when_plain() -> None:
    text = (
        "version: 1\nlisten: ${HOST:-127.0.0.1}:${PORT}\nlimits:\n  max_body_bytes: ${MAX:-2048}\n"
        + HEAD[11:]
        + ROUTE
    )

    result = load_text(text, "routes.yaml", environ={"PORT": "9999"})

    assert result.config is not None
    assert result.config.listen == ("127.0.0.1", 9999)
    assert result.config.max_body_bytes == 2048


def test_an_unknown_service_from_the_environment_is_not_quoted_back() -> None:
    text = HEAD + "  - prefix: /a\n    service: ${SERVICE}\n"

    result = load_text(text, "routes.yaml", environ={"SERVICE": "s3cr3t-svc"})

    assert [str(e) for e in result.errors] == [
        "routes.yaml:6:14: routes.0.service: unknown service (the value from the environment)"
    ]


def test_an_invalid_env_value_is_not_quoted_back() -> None:
    text = HEAD.replace("http://127.0.0.1:8001", "${UPSTREAM}") + ROUTE

    result = load_text(text, "routes.yaml", environ={"UPSTREAM": "s3cr3t-token"})

    assert result.errors
    assert all("s3cr3t" not in str(e) for e in result.errors)


def test_durations_compile_to_seconds() -> None:
    text = (
        "version: 1\nservices:\n  s:\n    targets: [http://h:1]\n"
        "    timeouts: {connect: 250ms, read: 1m, total: 1h}\nroutes:\n  - {prefix: /, service: s}\n"
    )

    result = load_text(text, "routes.yaml", environ={})

    assert result.config is not None
    timeouts = result.config.services["s"].timeouts
    assert (timeouts.connect, timeouts.read, timeouts.total) == (0.25, 60.0, 3600.0)


def test_check_prints_errors_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(HEAD + ROUTE + "    strip_prefx: true\n")

    code = main(["--check", "--config", str(path)])

    assert code == 1
    assert f"{path}:7:5: routes.0.strip_prefx: unknown key" in capsys.readouterr().err


def test_check_exits_0_on_the_shipped_routes_file(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = Path(__file__).resolve().parents[2] / "routes.yaml"

    code = main(["--check", "--config", str(shipped)])

    assert code == 0
    assert "ok" in capsys.readouterr().out


def test_unreadable_file_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--check", "--config", str(tmp_path / "missing.yaml")])

    assert code == 1
    assert "missing.yaml:1:1: <root>: cannot read file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            "response_headers: {remove: [Content-Length]}",
            "routes.yaml:7:33: routes.0.response_headers.remove.0: Content-Length frames the message or belongs to one hop; it cannot be changed",
        ),
        (
            "request_headers: {set: {Transfer-Encoding: chunked}}",
            "routes.yaml:7:29: routes.0.request_headers.set.Transfer-Encoding: Transfer-Encoding frames the message or belongs to one hop; it cannot be changed",
        ),
    ],
    ids=["remove_content_length", "set_transfer_encoding"],
)
def test_header_rules_cannot_touch_framing_headers(rule: str, expected: str) -> None:
    result = load_text(HEAD + ROUTE + "    " + rule + "\n", "routes.yaml", environ={})

    assert [str(e) for e in result.errors] == [expected]


RULE_CASES = [
    (
        "crlf_in_a_set_value",
        '    request_headers: {set: {X-Token: "a\\r\\nX-Admin: 1"}}\n',
        [
            "routes.yaml:7:38: routes.0.request_headers.set.X-Token: the value holds a line break (CR); a header value may hold no control character but tab"
        ],
    ),
    (
        "nul_in_a_response_value",
        '    response_headers: {set: {X-Nul: "a\\0b"}}\n',
        [
            "routes.yaml:7:37: routes.0.response_headers.set.X-Nul: the value holds a NUL character; a header value may hold no control character but tab"
        ],
    ),
    (
        "other_controls_but_not_tab_or_utf8",
        '    request_headers: {set: {X-Bell: "a\\x07b", X-Del: "a\\x7fb", X-Tab: "a\\tb", X-Utf: "é€"}}\n',
        [
            "routes.yaml:7:37: routes.0.request_headers.set.X-Bell: the value holds the control character U+0007; a header value may hold no control character but tab",
            "routes.yaml:7:54: routes.0.request_headers.set.X-Del: the value holds the control character U+007F; a header value may hold no control character but tab",
        ],
    ),
    (
        "block_scalar_keeps_its_final_newline",
        "    request_headers:\n      set:\n        X-Token: |\n          abc\n",
        [
            "routes.yaml:9:18: routes.0.request_headers.set.X-Token: the value holds a line break (LF); a header value may hold no control character but tab"
        ],
    ),
    (
        "names_that_are_not_tokens",
        '    request_headers: {set: {"X Bad": v, "X:Bad": v, "": v}, remove: ["X(Bad)"]}\n',
        [
            "routes.yaml:7:29: routes.0.request_headers.set.X Bad: name 'X Bad' is not a valid HTTP header name",
            "routes.yaml:7:41: routes.0.request_headers.set.X:Bad: name 'X:Bad' is not a valid HTTP header name",
            "routes.yaml:7:53: routes.0.request_headers.set.: name '' is not a valid HTTP header name",
            "routes.yaml:7:70: routes.0.request_headers.remove.0: is not a valid HTTP header name",
        ],
    ),
    (
        "value_from_the_environment_is_not_quoted_back",
        '    request_headers: {set: {X-Token: "${TOKEN}"}}\n',
        [
            "routes.yaml:7:38: routes.0.request_headers.set.X-Token: the value from the environment holds a line break (LF); a header value may hold no control character but tab"
        ],
    ),
]


@pytest.mark.parametrize(
    ("rule", "expected"), [c[1:] for c in RULE_CASES], ids=[c[0] for c in RULE_CASES]
)
def test_header_rules_need_token_names_and_values_without_control_characters(
    rule: str, expected: list[str]
) -> None:
    environ = {"TOKEN": "s3cr3t\nX-Admin: 1"}

    result = load_text(HEAD + ROUTE + rule, "routes.yaml", environ=environ)

    assert [str(e) for e in result.errors] == expected
    assert all("s3cr3t" not in str(e) for e in result.errors)


def test_a_header_value_with_tab_and_utf8_compiles() -> None:
    rule = '    request_headers: {set: {X-Tab: "a\\tb", X-Utf: "é€"}}\n'

    result = load_text(HEAD + ROUTE + rule, "routes.yaml", environ={})

    assert result.config is not None
    assert result.config.routes[0].request_headers.set == (("X-Tab", "a\tb"), ("X-Utf", "é€"))


READY_CASES = [
    (
        "unknown_services_suggest_a_close_name_and_hide_env_values",
        'admin_ready_requires: [inventroy, inventory, "${SVC}", accounts]\n',
        [
            "routes.yaml:2:24: admin_ready_requires.0: unknown service 'inventroy'; did you mean 'inventory'?",
            "routes.yaml:2:46: admin_ready_requires.2: unknown service (the value from the environment)",
            "routes.yaml:2:56: admin_ready_requires.3: unknown service 'accounts'",
        ],
    ),
    (
        "a_single_name_is_not_a_list",
        "admin_ready_requires: inventory\n",
        ["routes.yaml:2:23: admin_ready_requires: must be a list"],
    ),
    (
        "a_name_listed_twice",
        "admin_ready_requires: [inventory, inventory]\n",
        ["routes.yaml:2:23: admin_ready_requires: must not list an item twice"],
    ),
    (
        "underscores_must_be_a_boolean",
        "underscores_in_headers: 1\n",
        ["routes.yaml:2:25: underscores_in_headers: must be true or false"],
    ),
]


@pytest.mark.parametrize(
    ("top", "expected"), [c[1:] for c in READY_CASES], ids=[c[0] for c in READY_CASES]
)
def test_top_level_readiness_and_underscore_keys_are_checked(top: str, expected: list[str]) -> None:
    text = "version: 1\n" + top + HEAD[11:] + ROUTE

    result = load_text(text, "routes.yaml", environ={"SVC": "s3cr3t-svc"})

    assert [str(e) for e in result.errors] == expected


def test_underscores_in_headers_is_a_default_that_a_route_may_override() -> None:
    text = (
        "version: 1\nunderscores_in_headers: true\nadmin_ready_requires: [inventory]\n"
        + HEAD[11:]
        + ROUTE
        + "  - {prefix: /strict, service: inventory, underscores_in_headers: false}\n"
        + "  - {prefix: /other, service: inventory}\n"
    )

    result = load_text(text, "routes.yaml", environ={})

    assert result.config is not None
    assert [r.underscores_in_headers for r in result.config.routes] == [True, False, True]
    assert result.config.admin_ready_requires == ("inventory",)
    default = load_text(HEAD + ROUTE, "routes.yaml", environ={}).config
    assert default is not None
    assert (default.routes[0].underscores_in_headers, default.admin_ready_requires) == (False, ())


def test_dns_discovery_compiles_its_interval_and_turns_the_circuit_breaker_on() -> None:
    text = (
        "version: 1\nservices:\n  s:\n    targets: [http://h.internal:1]\n"
        "    discovery: {dns: {interval: 2s}}\n  t: {targets: [http://h:1], discovery: {dns: {}}}\n"
        "routes:\n  - {prefix: /, service: s}\n"
    )

    result = load_text(text, "routes.yaml", environ={})

    assert result.config is not None, [str(e) for e in result.errors]
    s, t = result.config.services["s"], result.config.services["t"]
    assert s.discovery == DnsDiscoveryConfig(interval=2.0)
    assert t.discovery == DnsDiscoveryConfig(interval=10.0)
    assert s.circuit_breaker is not None  # one name may hold many addresses
