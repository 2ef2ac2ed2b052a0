//! Shards by customer: the key is the metadata's `customer_id` if it is a string, else the data's
//! `customer_id` if it is a string, else the stream name; the shard is the FNV-1a 64-bit hash of
//! the key's UTF-8 bytes modulo the shard count.

use refract_guest::{Event, fnv1a_64};
use serde_json::Value;

fn customer_id(json: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(json)
        .ok()?
        .get("customer_id")?
    {
        Value::String(id) => Some(id.clone()),
        _ => None,
    }
}

#[refract_guest::sharder]
fn shard(event: &Event, shards: u32) -> u32 {
    let key = customer_id(event.metadata())
        .or_else(|| customer_id(event.data()))
        .unwrap_or_else(|| event.stream().to_owned());
    (fnv1a_64(key.as_bytes()) % u64::from(shards)) as u32
}
