"""Customer tiers from the orders customers place: one state per customer, a count of customers
per tier, a stream of links to each customer's orders, and an event when a customer moves up.

Reads ``OrderPlaced {"customer_id", "total_cents"}`` of the ``order-…`` streams, partitioned by
customer id (custom partitioning). State per customer: ``{"orders", "total_cents", "tier"}``.
Table ``customers_by_tier``: tier → ``{"customers"}``. Links each order to
``orders-of-<customer id>``. When a customer reaches a new tier it logs a line and, deployed with
``--emit``, emits ``TierReached {"customer_id", "order", "tier"}`` to ``tier-<customer id>``.
``projections/customer-tiers-js`` is the same projection in JavaScript.
"""

from dataclasses import dataclass

from refract_guest import Ctx, Event, WitWorld, projection  # noqa: F401 (WitWorld: the exports)

# Tiers by total spent, highest first.
TIERS = [("gold", 25_000), ("silver", 10_000), ("bronze", 0)]


@dataclass
class Customer:
    orders: int = 0
    total_cents: int = 0
    tier: str = ""


@dataclass
class TierCount:
    customers: int = 0


def customer_of(event: Event):
    return event.json().get("customer_id")


@projection(category="order", event_types=["OrderPlaced"], partition_by=customer_of)
def apply(customer: Customer, event: Event, ctx: Ctx):
    placed = event.json()
    customer_id = placed["customer_id"]
    customer.orders += 1
    customer.total_cents += placed["total_cents"]
    ctx.link_to(f"orders-of-{customer_id}", event)
    tier = next(name for name, floor in TIERS if customer.total_cents >= floor)
    if tier == customer.tier:
        return
    table = ctx.table("customers_by_tier")
    if customer.tier:
        left = table.get(customer.tier, TierCount)
        left.customers -= 1
        table.put(customer.tier, left)
    reached = table.get(tier, TierCount) or TierCount()
    reached.customers += 1
    table.put(tier, reached)
    customer.tier = tier
    print(f"customer {customer_id} reached {tier} with order {event.stream}")
    if ctx.may_emit():
        ctx.emit(
            f"tier-{customer_id}",
            "TierReached",
            {"customer_id": customer_id, "order": event.stream, "tier": tier},
        )
