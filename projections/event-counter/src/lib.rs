//! Counts every event in `$all`, in total and by type: `{"count": n, "by_type": {"<type>": n}}`.

use std::collections::BTreeMap;

use refract_guest::{Ctx, Event};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Counts {
    count: u64,
    by_type: BTreeMap<String, u64>,
}

#[refract_guest::projection(all)]
fn apply(counts: &mut Counts, event: &Event, _ctx: &mut Ctx) -> anyhow::Result<()> {
    counts.count += 1;
    match counts.by_type.get_mut(event.event_type()) {
        Some(count) => *count += 1,
        None => {
            counts.by_type.insert(event.event_type().to_owned(), 1);
        }
    }
    Ok(())
}
