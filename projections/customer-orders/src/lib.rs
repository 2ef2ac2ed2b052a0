//! Orders counted per customer, partitioned by `customer-<id>`: a partition key that is also a
//! stream name, so a Kafka source can land each order record in its customer's stream
//! (`"stream": {"strategy": "projection", "value": "customer-orders"}`).
//!
//! State per customer: `{"orders"}`.

use refract_guest::{Ctx, Event};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Customer {
    orders: u64,
}

#[derive(Deserialize)]
struct ForCustomer {
    customer_id: String,
}

/// `customer-<id>` of an event whose data names its customer; other events are left out.
fn customer_stream(event: &Event) -> Option<String> {
    let order: ForCustomer = event.json().ok()?;
    Some(format!("customer-{}", order.customer_id))
}

#[refract_guest::projection(category = "order", partition_by = customer_stream)]
fn apply(customer: &mut Customer, _event: &Event, _ctx: &mut Ctx) -> anyhow::Result<()> {
    customer.orders += 1;
    Ok(())
}
