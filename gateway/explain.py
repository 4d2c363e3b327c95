"""`gateway explain --config FILE METHOD PATH`: which route answers a request, the upstream
URL it would call, and the stages in its chain, or the 404/405 it would give. Nothing is sent.
"""

from __future__ import annotations

import argparse
import sys

from gateway.config.build import load
from gateway.config.model import AggregateAction, ComposeAction, GatewayConfig
from gateway.http.errors import GatewayError
from gateway.http.routing import normalize_path, split_target, strip
from gateway.runtime.assemble import build_table
from gateway.upstream.service import Service


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gateway explain")
    parser.add_argument("--config", default="routes.yaml")
    parser.add_argument("method")
    parser.add_argument("path", help="request target, e.g. '/api/inventory/devices?room=hall'")
    args = parser.parse_args(argv)
    result = load(args.config)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    if result.config is None:
        return 1
    print(explain(result.config, args.method.upper(), args.path))
    return 0


def explain(config: GatewayConfig, method: str, target: str) -> str:
    """Describe how `method target` would be handled; sends nothing."""
    services = {name: Service(c) for name, c in config.services.items()}
    table = build_table(config, services)
    raw_path, query = split_target(target)
    try:
        path = normalize_path(raw_path)
        route = table.match(method, path)
    except GatewayError as error:
        allow = f" (Allow: {error.headers['Allow']})" if "Allow" in error.headers else ""
        return f"{method} {target}\n  -> {error.status} {error.title}: {error.detail}{allow}"
    rc = route.config
    lines = [
        f"{method} {target}",
        f"  normalized path: {path}",
        f"  route:    {rc.name} (prefix {rc.prefix}, methods {', '.join(sorted(rc.methods))})",
    ]
    action = rc.action
    if isinstance(action, AggregateAction):  # each part, with its placeholders as written
        lines += [
            f"  part:     {name}: {part.method} {part.service} {part.path}"
            + ("" if part.required else " (optional)")
            for name, part in action.parts
        ]
    elif isinstance(action, ComposeAction):
        lines.append(f"  handler:  {action.handler}")
    else:
        upstream_path = (strip(rc.prefix, path) if rc.strip_prefix else path) + query
        service = services[rc.service]
        lines += [
            f"  service:  {rc.service} ({service.config.balance}, {len(service.targets)} targets)",
            f"  upstream: {service.targets[0].url}{upstream_path}",
        ]
    lines.append(f"  stages:   {' > '.join(route.stages)}")
    return "\n".join(lines)
