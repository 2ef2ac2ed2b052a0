// Counts every event in $all, in total and by type: {"count": n, "by_type": {"<type>": n}}.
// The JavaScript twin of projections/event-counter, which writes a byte-identical state.

import { projection } from "./refract-guest.js";

export const { describe, partitionKey, handle } = projection({
  // A Map for the Rust BTreeMap: its keys are written sorted by their bytes.
  state: () => ({ count: 0, by_type: new Map() }),
  apply(counts, event) {
    counts.count += 1;
    counts.by_type.set(event.eventType, (counts.by_type.get(event.eventType) ?? 0) + 1);
  },
});
