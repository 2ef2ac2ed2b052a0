//! Orders and what each customer ordered, from the `order-…` streams.
//!
//! State per order stream: `{"customer_id", "lines", "total_cents", "status"}`. Table
//! `by_customer`: customer id → `{"orders", "total_cents"}`. When deployed with `--emit`, a shipped
//! order emits `CustomerNotified {"order": <stream>}` to `notify-<customer id>`.

use refract_guest::{Ctx, Event};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Order {
    customer_id: String,
    lines: u64,
    total_cents: i64,
    status: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Customer {
    orders: i64,
    total_cents: i64,
}

#[derive(Deserialize)]
struct OrderPlaced {
    customer_id: String,
    total_cents: i64,
}

#[derive(Deserialize)]
struct ItemAdded {
    // Required, so an item without one faults the projection, though the summary does not use it.
    #[allow(dead_code)]
    sku: String,
    price_cents: i64,
}

#[refract_guest::projection(category = "order", partition = "stream")]
fn apply(order: &mut Order, event: &Event, ctx: &mut Ctx) -> anyhow::Result<()> {
    match event.event_type() {
        "OrderPlaced" => {
            let placed: OrderPlaced = event.json()?;
            *order = Order {
                customer_id: placed.customer_id,
                lines: 0,
                total_cents: placed.total_cents,
                status: "placed".into(),
            };
            update_customer(ctx, &order.customer_id, 1, placed.total_cents)?;
        }
        "ItemAdded" => {
            let item: ItemAdded = event.json()?;
            order.lines += 1;
            order.total_cents += item.price_cents;
            update_customer(ctx, &order.customer_id, 0, item.price_cents)?;
        }
        "OrderShipped" => {
            order.status = "shipped".into();
            if ctx.may_emit() {
                let stream = format!("notify-{}", order.customer_id);
                ctx.emit(
                    &stream,
                    "CustomerNotified",
                    &serde_json::json!({"order": event.stream()}),
                )?;
            }
        }
        "OrderCancelled" => {
            order.status = "cancelled".into();
            update_customer(ctx, &order.customer_id, -1, -order.total_cents)?;
        }
        _ => {}
    }
    Ok(())
}

fn update_customer(
    ctx: &mut Ctx,
    customer_id: &str,
    orders: i64,
    cents: i64,
) -> anyhow::Result<()> {
    let mut table = ctx.table("by_customer");
    let mut customer: Customer = table.get(customer_id)?.unwrap_or_default();
    customer.orders += orders;
    customer.total_cents += cents;
    table.put(customer_id, &customer)
}
