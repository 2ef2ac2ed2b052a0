// Customer tiers from the orders customers place: one state per customer, a count of customers
// per tier, a stream of links to each customer's orders, and an event when a customer moves up.
//
// Reads OrderPlaced {"customer_id", "total_cents"} of the order-… streams, partitioned by
// customer id (custom partitioning). State per customer: {"orders", "total_cents", "tier"}.
// Table customers_by_tier: tier → {"customers"}. Links each order to orders-of-<customer id>.
// When a customer reaches a new tier it logs a line and, deployed with --emit, emits
// TierReached {"customer_id", "order", "tier"} to tier-<customer id>.
// projections/customer-tiers-py is the same projection in Python.

import { projection } from "./refract-guest.js";

// Tiers by total spent, highest first.
const TIERS = [
  ["gold", 25_000],
  ["silver", 10_000],
  ["bronze", 0],
];

export const { describe, partitionKey, handle } = projection({
  category: "order",
  eventTypes: ["OrderPlaced"],
  partitionBy: (event) => event.json().customer_id,
  state: () => ({ orders: 0, total_cents: 0, tier: "" }),
  apply(customer, event, ctx) {
    const placed = event.json();
    const customerId = placed.customer_id;
    if (typeof placed.total_cents !== "number") {
      throw new TypeError(`OrderPlaced without total_cents: ${JSON.stringify(placed)}`);
    }
    customer.orders += 1;
    customer.total_cents += placed.total_cents;
    ctx.linkTo(`orders-of-${customerId}`, event);
    const [tier] = TIERS.find(([, floor]) => customer.total_cents >= floor);
    if (tier === customer.tier) return;
    const table = ctx.table("customers_by_tier");
    if (customer.tier) {
      const left = table.get(customer.tier);
      left.customers -= 1;
      table.put(customer.tier, left);
    }
    const reached = table.get(tier) ?? { customers: 0 };
    reached.customers += 1;
    table.put(tier, reached);
    customer.tier = tier;
    console.log(`customer ${customerId} reached ${tier} with order ${event.stream}`);
    if (ctx.mayEmit()) {
      ctx.emit(`tier-${customerId}`, "TierReached", {
        customer_id: customerId,
        order: event.stream,
        tier,
      });
    }
  },
});
