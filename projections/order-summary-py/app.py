"""Orders and what each customer ordered, from the ``order-…`` streams: the Python twin of
``projections/order-summary``, which writes byte-identical states and rows.

State per order stream: ``{"customer_id", "lines", "total_cents", "status"}``. Table
``by_customer``: customer id → ``{"orders", "total_cents"}``. When deployed with ``--emit``, a
shipped order emits ``CustomerNotified {"order": <stream>}`` to ``notify-<customer id>``.
"""

from dataclasses import dataclass

from refract_guest import Ctx, Event, WitWorld, projection  # noqa: F401 (WitWorld: the exports)


# Fields in the order of the Rust struct: states are written in declaration order.
@dataclass
class Order:
    customer_id: str = ""
    lines: int = 0
    total_cents: int = 0
    status: str = ""


@dataclass
class Customer:
    orders: int = 0
    total_cents: int = 0


@projection(category="order", partition="stream")
def apply(order: Order, event: Event, ctx: Ctx):
    kind = event.event_type
    if kind == "OrderPlaced":
        placed = event.json()
        order = Order(placed["customer_id"], 0, placed["total_cents"], "placed")
        update_customer(ctx, order.customer_id, 1, placed["total_cents"])
        return order
    if kind == "ItemAdded":
        item = event.json()
        item["sku"]  # required, as in the Rust example: an item without one faults
        order.lines += 1
        order.total_cents += item["price_cents"]
        update_customer(ctx, order.customer_id, 0, item["price_cents"])
    elif kind == "OrderShipped":
        order.status = "shipped"
        if ctx.may_emit():
            ctx.emit(f"notify-{order.customer_id}", "CustomerNotified", {"order": event.stream})
    elif kind == "OrderCancelled":
        order.status = "cancelled"
        update_customer(ctx, order.customer_id, -1, -order.total_cents)
    return None


def update_customer(ctx: Ctx, customer_id: str, orders: int, cents: int):
    table = ctx.table("by_customer")
    customer = table.get(customer_id, Customer) or Customer()
    customer.orders += orders
    customer.total_cents += cents
    table.put(customer_id, customer)
