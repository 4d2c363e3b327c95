"""The order flow (routes.yaml: POST /api/shop/orders), composed from three services:

  1. check each item's stock                  (out of stock: 409 naming the product)
  2. take the payment                         (declined: 402, and nothing has changed)
  3. take each item from stock                (sold out meanwhile: 409, payment refunded)
  4. create the order, and answer 201 with it (failed: 502, payment refunded, stock back)

Steps 2 and 3 register their undo with `ctx.on_failure`; a failure after them runs those
newest first, and the problem's `steps` member shows each step as applied, failed or
compensated. Every write carries an idempotency key, so the gateway may retry it on another
target and the service does it once.

A request: {"items": [{"product": "lamp", "quantity": 1}], "card": "4242424242424242"}
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

from gateway.actions.compose import ComposeRequest, Context
from gateway.http.errors import CallFailed
from gateway.http.pipeline import UpstreamResponse

Item = tuple[str, int]  # (product id, quantity)


def _items(order: Any) -> tuple[list[Item], str] | None:
    if not isinstance(order, dict) or not isinstance(order.get("card"), str):
        return None
    items = order.get("items")
    if not isinstance(items, list) or not items:
        return None
    found = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("product"), str):
            return None
        quantity = item.get("quantity", 1)
        if not isinstance(quantity, int) or quantity < 1:
            return None
        found.append((item["product"], quantity))
    return found, order["card"]


async def place_order(ctx: Context, request: ComposeRequest) -> UpstreamResponse:
    parsed = _items(await request.json())
    if parsed is None:
        ctx.fail(422, 'send {"items": [{"product": ID, "quantity": N}, ...], "card": "..."}')
    items, card = parsed
    key = uuid.uuid4().hex  # this order's idempotency keys: one per write

    total, names = 0, {}
    for product_id, quantity in items:  # 1. stock
        got = await ctx.call("products", "GET", f"/{quote(product_id, safe='')}")
        if got.status == 404:
            ctx.fail(422, f"no product {product_id[:40]!r}", product=product_id)
        if not got.ok:
            ctx.fail(502, f"the products service answered {got.status}")
        names[product_id] = got.json["name"]
        if got.json["stock"] < quantity:
            ctx.fail(409, f"out of stock: {got.json['name']}", product=product_id)
        total += got.json["price"] * quantity

    paid = await ctx.call(  # 2. payment
        "payments", "POST", "/", json={"amount": total, "card": card}, idempotency_key=f"{key}:pay"
    )
    if paid.status == 402:
        ctx.fail(402, "the payment was declined; nothing was charged or changed")
    if not paid.ok:
        ctx.fail(502, f"the payments service answered {paid.status}")
    payment = paid.json["id"]
    ctx.on_failure(_refund(ctx, payment, key))

    for product_id, quantity in items:  # 3. stock down
        path = f"/{quote(product_id, safe='')}"
        took = await ctx.call(
            "products", "POST", f"{path}/take", json={"quantity": quantity},
            idempotency_key=f"{key}:take:{product_id}",
        )  # fmt: skip
        if took.status == 409:
            ctx.fail(409, f"out of stock: {names[product_id]}; the payment was refunded",
                     product=product_id)  # fmt: skip
        if not took.ok:
            ctx.fail(502, f"the products service answered {took.status}")
        ctx.on_failure(_restock(ctx, path, quantity, f"{key}:restock:{product_id}"))

    order = {"items": [{"product": p, "quantity": q} for p, q in items], "payment": payment,
             "total": total}  # fmt: skip
    try:  # 4. the order
        created = await ctx.call("orders", "POST", "/", json=order, idempotency_key=f"{key}:order")
    except CallFailed:
        created = None
    if created is None or not created.ok:
        ctx.fail(502, "the order service did not take the order; the payment was refunded and "
                 "the stock put back")  # fmt: skip
    return ctx.json(201, {"order": created.json, "steps": ctx.steps},
                    headers={"Location": f"/api/shop/orders/{created.json['id']}"})  # fmt: skip


async def _refund(ctx: Context, payment: str, key: str) -> None:
    done = await ctx.call("payments", "POST", f"/{payment}/refund", idempotency_key=f"{key}:refund")
    if not done.ok:
        raise RuntimeError(f"refund of {payment} answered {done.status}")


async def _restock(ctx: Context, path: str, quantity: int, key: str) -> None:
    done = await ctx.call(
        "products", "POST", f"{path}/restock", json={"quantity": quantity}, idempotency_key=key
    )
    if not done.ok:
        raise RuntimeError(f"restock answered {done.status}")
