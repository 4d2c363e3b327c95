"""The shop example end to end: its three services as real servers, the gateway from
examples/shop/routes.yaml, and POST /api/shop/orders placing, refusing and undoing orders."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from examples.shop.services import make_orders_app, make_payments_app, make_products_app
from tests.examples.conftest import REPO, MakeGateway
from tests.gateway.conftest import GatewayClient
from tests.polling import free_port

CARD = "4242424242424242"
DECLINED = "4000000000000002"


def url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def shop(
    aiohttp_server: AiohttpServer,
    gateway_from: MakeGateway,
    *,
    orders_down: bool = False,
    products: dict[str, dict[str, Any]] | None = None,
) -> tuple[GatewayClient, TestServer, TestServer]:
    stock = await aiohttp_server(make_products_app(products))
    payments = await aiohttp_server(make_payments_app())
    orders = None if orders_down else await aiohttp_server(make_orders_app())
    environ = {
        "SHOP_PRODUCTS_URL": url(stock),
        "SHOP_PAYMENTS_URL": url(payments),
        "SHOP_ORDERS_URL": f"http://127.0.0.1:{free_port()}" if orders is None else url(orders),
    }
    client = await gateway_from(REPO / "examples" / "shop" / "routes.yaml", environ)
    return client, stock, payments


async def state(client: GatewayClient) -> tuple[dict[str, int], list[dict[str, Any]]]:
    products = await (await client.get("/api/shop/products")).json()
    payments = await (await client.get("/api/shop/payments")).json()
    return {p["id"]: p["stock"] for p in products}, payments


def captured(payments: list[dict[str, Any]]) -> int:
    return sum(p["amount"] for p in payments if p["status"] == "captured")


async def test_an_order_is_placed_paid_and_taken_from_stock(
    aiohttp_server: AiohttpServer, gateway_from: MakeGateway
) -> None:
    client, _, _ = await shop(aiohttp_server, gateway_from)

    resp = await client.post(
        "/api/shop/orders", json={"items": [{"product": "lamp", "quantity": 2}], "card": CARD}
    )
    body = await resp.json()
    stock, payments = await state(client)
    orders = await (await client.get("/api/shop/orders")).json()

    assert resp.status == 201
    assert body["order"]["total"] == 5000
    assert resp.headers["Location"] == f"/api/shop/orders/{body['order']['id']}"
    assert [s["state"] for s in body["steps"]] == ["applied"] * 4  # check, pay, take, order
    assert stock["lamp"] == 3
    assert captured(payments) == 5000
    assert [o["id"] for o in orders] == [body["order"]["id"]]


async def test_out_of_stock_is_409_naming_the_product_and_nothing_is_charged(
    aiohttp_server: AiohttpServer, gateway_from: MakeGateway
) -> None:
    client, _, _ = await shop(aiohttp_server, gateway_from)

    resp = await client.post(
        "/api/shop/orders", json={"items": [{"product": "plant"}], "card": CARD}
    )
    problem = await resp.json()
    _, payments = await state(client)

    assert resp.status == 409
    assert problem["detail"] == "out of stock: Fern"
    assert problem["product"] == "plant"
    assert payments == []


async def test_a_declined_payment_is_402_and_nothing_changes(
    aiohttp_server: AiohttpServer, gateway_from: MakeGateway
) -> None:
    client, _, _ = await shop(aiohttp_server, gateway_from)
    before = await state(client)

    resp = await client.post(
        "/api/shop/orders", json={"items": [{"product": "lamp"}], "card": DECLINED}
    )

    assert resp.status == 402
    assert "declined" in (await resp.json())["detail"]
    assert await state(client) == before


async def test_an_order_service_that_is_down_leaves_stock_and_payments_as_they_were(
    aiohttp_server: AiohttpServer, gateway_from: MakeGateway
) -> None:
    client, _, _ = await shop(aiohttp_server, gateway_from, orders_down=True)
    stock_before, payments_before = await state(client)

    resp = await client.post(
        "/api/shop/orders",
        json={"items": [{"product": "lamp"}, {"product": "kettle", "quantity": 2}], "card": CARD},
    )
    problem = await resp.json()
    stock_after, payments_after = await state(client)

    assert resp.status == 502
    assert "refunded" in problem["detail"]
    assert [(s["service"], s["method"], s["state"]) for s in problem["steps"]] == [
        ("products", "GET", "applied"),
        ("products", "GET", "applied"),
        ("payments", "POST", "compensated"),
        ("products", "POST", "compensated"),
        ("products", "POST", "compensated"),
        ("orders", "POST", "failed"),
    ]
    assert stock_after == stock_before
    assert captured(payments_after) == captured(payments_before) == 0
    assert [p["status"] for p in payments_after] == ["refunded"]


@pytest.mark.parametrize("buyers", [20])
async def test_concurrent_orders_for_the_last_items_sell_exactly_that_many(
    aiohttp_server: AiohttpServer, gateway_from: MakeGateway, buyers: int
) -> None:
    last_five = {"lamp": {"name": "Desk lamp", "price": 2500, "stock": 5}}
    client, _, _ = await shop(aiohttp_server, gateway_from, products=last_five)
    order = {"items": [{"product": "lamp"}], "card": CARD}

    answers = await asyncio.gather(
        *(client.post("/api/shop/orders", json=order) for _ in range(buyers))
    )
    statuses = sorted(resp.status for resp in answers)
    stock, payments = await state(client)
    orders = await (await client.get("/api/shop/orders")).json()

    assert statuses == [201] * 5 + [409] * (buyers - 5)
    assert stock["lamp"] == 0
    assert len(orders) == 5
    assert captured(payments) == 5 * 2500  # every other payment taken was refunded
    assert all(p["status"] == "refunded" for p in payments if p["id"] not in
               {o["payment"] for o in orders})  # fmt: skip
