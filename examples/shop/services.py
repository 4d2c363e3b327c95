"""Three small services for the shop example, each its own aiohttp application and process
(`python -m examples.shop products|payments|orders --listen HOST:PORT`). State is in memory:
a restart starts over.

products   GET /            every product: {id, name, price (cents), stock}
           GET /{id}        one product, or 404
           POST /{id}/take  {"quantity": n}: takes n from stock at once, or 409 when fewer
                            are left (one lock: concurrent orders never oversell)
           POST /{id}/restock {"quantity": n}: puts n back
payments   POST /           {"amount": cents, "card": "..."}: 201 captured, or 402 declined
                            (a card ending in 0002 is always declined)
           POST /{id}/refund  the payment back: 200 refunded
           GET /            every payment with its status
orders     POST /           {"items": [...], "payment": id, "total": cents}: 201
           GET /            every order

Every POST honours an `Idempotency-Key`: the same key gets the first answer again, so a
retried write is never done twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

DECLINED_SUFFIX: Final = "0002"
INITIAL_PRODUCTS: Final = {
    "lamp": {"name": "Desk lamp", "price": 2500, "stock": 5},
    "kettle": {"name": "Kettle", "price": 3900, "stock": 3},
    "plant": {"name": "Fern", "price": 1200, "stock": 0},
}
STATE: Final = web.AppKey("state", dict)
ONCE: Final = web.AppKey("once", dict)  # Idempotency-Key -> the first answer (status, body)
LOCK: Final = web.AppKey("lock", asyncio.Lock)
Handler = Callable[[web.Request], Awaitable[tuple[int, Any]]]


def _problem(status: int, detail: str, **members: Any) -> tuple[int, Any]:
    return status, {"status": status, "detail": detail, **members}


def idempotent(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """One write at a time (so stock is checked and taken as one step: concurrent orders
    never oversell), and a repeated Idempotency-Key gets the first answer, not a second
    write."""

    async def handle(request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        once = request.app[ONCE]
        async with request.app[LOCK]:
            if key is not None and (request.path, key) in once:
                status, body = once[(request.path, key)]
            else:
                status, body = await handler(request)
                if key is not None:
                    once[(request.path, key)] = (status, body)
        return web.json_response(body, status=status)

    return handle


async def _quantity(request: web.Request) -> int:
    try:
        quantity = (await request.json())["quantity"]
    except (ValueError, KeyError, TypeError) as exc:
        raise web.HTTPBadRequest(text='send {"quantity": n}') from exc
    if not isinstance(quantity, int) or quantity < 1:
        raise web.HTTPBadRequest(text="quantity must be a whole number above 0")
    return quantity


# --- products -----------------------------------------------------------------------------


def _product(request: web.Request) -> dict[str, Any]:
    product_id = request.match_info["id"]
    product = request.app[STATE].get(product_id)
    if product is None:
        raise web.HTTPNotFound(text=f"no product {product_id[:40]!r}")
    return {"id": product_id, **product}


async def list_products(request: web.Request) -> web.Response:
    return web.json_response([{"id": k, **v} for k, v in request.app[STATE].items()])


async def get_product(request: web.Request) -> web.Response:
    return web.json_response(_product(request))


async def take(request: web.Request) -> tuple[int, Any]:
    quantity = await _quantity(request)
    product = _product(request)
    stock = request.app[STATE][product["id"]]
    if stock["stock"] < quantity:  # checked and taken under the app's one lock
        return _problem(409, f"out of stock: {product['name']}", product=product["id"])
    stock["stock"] -= quantity
    return 200, {"id": product["id"], **stock}


async def restock(request: web.Request) -> tuple[int, Any]:
    quantity = await _quantity(request)
    product = _product(request)
    request.app[STATE][product["id"]]["stock"] += quantity
    return 200, {"id": product["id"], **request.app[STATE][product["id"]]}


def make_products_app(products: dict[str, dict[str, Any]] | None = None) -> web.Application:
    app = _app({k: dict(v) for k, v in (products or INITIAL_PRODUCTS).items()})
    app.router.add_get("/", list_products)
    app.router.add_get("/{id}", get_product)
    app.router.add_post("/{id}/take", idempotent(take))
    app.router.add_post("/{id}/restock", idempotent(restock))
    return app


# --- payments -----------------------------------------------------------------------------


async def pay(request: web.Request) -> tuple[int, Any]:
    try:
        wanted = await request.json()
        amount, card = int(wanted["amount"]), str(wanted["card"])
    except (ValueError, KeyError, TypeError) as exc:
        raise web.HTTPBadRequest(text='send {"amount": cents, "card": "..."}') from exc
    if card.endswith(DECLINED_SUFFIX) or amount <= 0:
        return _problem(402, "card declined")
    payments = request.app[STATE]
    payment = {"id": f"pay-{len(payments) + 1}", "amount": amount, "status": "captured"}
    payments[payment["id"]] = payment
    return 201, payment


async def refund(request: web.Request) -> tuple[int, Any]:
    payment = request.app[STATE].get(request.match_info["id"])
    if payment is None:
        return _problem(404, "no such payment")
    payment["status"] = "refunded"
    return 200, payment


async def list_payments(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[STATE].values()))


def make_payments_app() -> web.Application:
    app = _app({})
    app.router.add_post("/", idempotent(pay))
    app.router.add_post("/{id}/refund", idempotent(refund))
    app.router.add_get("/", list_payments)
    return app


# --- orders -------------------------------------------------------------------------------


async def create_order(request: web.Request) -> tuple[int, Any]:
    wanted = await request.json()
    orders = request.app[STATE]
    order = {"id": f"order-{len(orders) + 1}", **wanted, "status": "placed"}
    orders[order["id"]] = order
    return 201, order


async def list_orders(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[STATE].values()))


def make_orders_app() -> web.Application:
    app = _app({})
    app.router.add_post("/", idempotent(create_order))
    app.router.add_get("/", list_orders)
    return app


def _app(state: dict[str, Any]) -> web.Application:
    app = web.Application()
    app[STATE], app[ONCE], app[LOCK] = state, {}, asyncio.Lock()
    return app


APPS: Final = {"products": make_products_app, "payments": make_payments_app,
               "orders": make_orders_app}  # fmt: skip
