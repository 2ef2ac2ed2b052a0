// Write Refract projections in JavaScript.
//
// A projection is a function of (state, event, ctx); `projection` names what it reads and how
// its state is divided, and returns the component's exports:
//
//   import { projection } from "./refract-guest.js";
//
//   export const { describe, partitionKey, handle } = projection({
//     category: "order",
//     partition: "stream",
//     state: () => ({ lines: 0, total_cents: 0 }),
//     apply(order, event, ctx) {
//       if (event.eventType === "ItemAdded") {
//         order.lines += 1;
//         order.total_cents += event.json().price_cents;
//       }
//     },
//   });
//
// States are loaded once per partition per batch and written back only when they changed. They
// and table rows are stored as compact JSON written the way the Rust SDK's serde writes them:
// an object's keys in their own order (like a Rust struct's fields), a Map's keys sorted by their
// UTF-8 bytes (like a BTreeMap). The same logic therefore gives the same digest in JavaScript,
// Python and Rust.

import * as host from "refract:projection/host@0.1.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** An event of the log. Positions, revisions and times are plain numbers. */
export class Event {
  #raw;

  constructor(raw) {
    this.#raw = raw;
  }

  /** The stream it was appended to. */
  get stream() {
    return this.#raw.stream;
  }

  /** Its number in its stream, from 0. */
  get revision() {
    return Number(this.#raw.revision);
  }

  /** Its position in the log, from 0. */
  get position() {
    return Number(this.#raw.position);
  }

  get id() {
    return this.#raw.id;
  }

  get eventType() {
    return this.#raw.eventType;
  }

  /** The payload's bytes: JSON text unless it was written as binary. */
  get data() {
    return this.#raw.data;
  }

  /** The metadata's bytes: a JSON object's text, or empty. */
  get metadata() {
    return this.#raw.metadata;
  }

  /** When it was appended, in milliseconds since the Unix epoch. */
  get createdMs() {
    return Number(this.#raw.createdMs);
  }

  /** The payload parsed from JSON; shaped like `template` (see `fromJson`) when given. */
  json(template) {
    try {
      return fromJson(this.#raw.data, template);
    } catch (error) {
      throw new Error(
        `the data of ${this.eventType} ${this.revision}@${this.stream} is not the JSON expected: ${error.message}`,
      );
    }
  }

  /** The metadata parsed from JSON; `undefined` when the event has none. */
  metadataJson(template) {
    return this.#raw.metadata.length === 0 ? undefined : fromJson(this.#raw.metadata, template);
  }

  toString() {
    return `${this.eventType} ${this.revision}@${this.stream}`;
  }
}

/** One read-model table of the projection: JSON rows by key. */
export class Table {
  #name;

  constructor(name) {
    this.#name = name;
  }

  /** The row at `key` (shaped like `template` when given), or `undefined`. */
  get(key, template) {
    const row = host.tableGet(this.#name, key);
    return row === undefined ? undefined : fromJson(row, template);
  }

  put(key, value) {
    host.tablePut(this.#name, key, toJson(value));
  }

  delete(key) {
    host.tableDelete(this.#name, key);
  }
}

/** What a projection can do besides changing its state: tables, emits, links, logs. */
export class Ctx {
  current = 0;
  #told;

  table(name) {
    return new Table(name);
  }

  /** Whether the projection was deployed with permission to emit events (`--emit`). */
  mayEmit() {
    return host.mayEmit();
  }

  /** Appends an event with `data` as its JSON payload to `stream`. */
  emit(stream, eventType, data, metadata) {
    const encodedData = toJson(data);
    let encodedMetadata = metadata == null ? new Uint8Array() : toJson(metadata);
    if (encodedMetadata.length === 2 && encodedMetadata[0] === 0x7b && encodedMetadata[1] === 0x7d) {
      encodedMetadata = new Uint8Array();
    }
    // Emitted events get the id of the event they come from as `$causationId`.
    if (this.#told !== this.current) {
      host.causedBy(BigInt(this.current));
      this.#told = this.current;
    }
    try {
      host.emit(stream, eventType, encodedData, encodedMetadata);
    } catch (error) {
      throw new Error(`cannot emit ${eventType} to ${stream}: ${reason(error)}`);
    }
  }

  /** Adds a link to `event` to `stream` (a stream that holds only links). */
  linkTo(stream, event) {
    try {
      host.linkTo(stream, BigInt(event.position));
    } catch (error) {
      throw new Error(`cannot link to ${stream}: ${reason(error)}`);
    }
  }

  /** Writes a line to the server's log (`console.log` does too). */
  log(message) {
    host.log(String(message));
  }
}

function reason(error) {
  return error?.payload ?? error;
}

/** FNV-1a, 64 bits, of a string's UTF-8 bytes or of bytes, as the Rust SDK's `fnv1a_64`. */
export function fnv1a64(value) {
  const bytes = typeof value === "string" ? encoder.encode(value) : value;
  let hash = 0xcbf29ce484222325n;
  for (const byte of bytes) {
    hash = ((hash ^ BigInt(byte)) * 0x100000001b3n) & 0xffffffffffffffffn;
  }
  return hash;
}

/** Orders strings by their UTF-8 bytes (code points), as Rust's `str` and `BTreeMap` do. */
export function compareUtf8(a, b) {
  const length = Math.min(a.length, b.length);
  for (let index = 0; index < length; index++) {
    const x = a.charCodeAt(index);
    const y = b.charCodeAt(index);
    if (x !== y) {
      return unitRank(x) - unitRank(y);
    }
  }
  return a.length - b.length;
}

// UTF-16 puts U+E000..U+FFFF above the surrogates of U+10000 and beyond; code points do not.
function unitRank(unit) {
  if (unit >= 0xe000) return unit - 0x800;
  if (unit >= 0xd800) return unit + 0x2000;
  return unit;
}

/** Compact JSON bytes as serde writes them: object keys in order, Map keys sorted by bytes. */
export function toJson(value) {
  return encoder.encode(write(value));
}

function write(value) {
  switch (typeof value) {
    case "string":
      return JSON.stringify(value);
    case "number":
      if (!Number.isFinite(value)) throw new TypeError(`cannot write ${value} as JSON`);
      return JSON.stringify(value);
    case "bigint":
      return value.toString();
    case "boolean":
      return value ? "true" : "false";
    case "undefined":
      return "null";
    case "object":
      break;
    default:
      throw new TypeError(`cannot write a ${typeof value} as JSON`);
  }
  if (value === null) return "null";
  if (Array.isArray(value) || value instanceof Uint8Array) {
    return `[${Array.from(value, write).join(",")}]`;
  }
  if (value instanceof Map) {
    const entries = Array.from(value);
    // Numbers as keys order by value, as a BTreeMap of integers does; text by its bytes.
    const numeric = entries.every(([key]) => typeof key === "number" || typeof key === "bigint");
    entries.sort(([a], [b]) =>
      numeric ? (a < b ? -1 : a > b ? 1 : 0) : compareUtf8(String(a), String(b)),
    );
    return `{${entries.map(([key, item]) => `${JSON.stringify(String(key))}:${write(item)}`).join(",")}}`;
  }
  const fields = [];
  for (const [key, item] of Object.entries(value)) {
    // As serde skips nothing but JavaScript has no `undefined` in JSON: like JSON.stringify.
    if (item !== undefined) fields.push(`${JSON.stringify(key)}:${write(item)}`);
  }
  return `{${fields.join(",")}}`;
}

/**
 * Parses JSON bytes. With a `template` (a value of the shape wanted, such as a new state),
 * objects that are Maps in the template become Maps, and keys come in the template's order, so a
 * state written back keeps its fields' order. A key the JSON lacks takes the template's value
 * (not a copy). A Map's values are shaped like its first entry, when it has one.
 */
export function fromJson(bytes, template) {
  return shape(JSON.parse(decoder.decode(bytes)), template);
}

function shape(value, template) {
  if (template === undefined || template === null || value === null || typeof value !== "object") {
    return value;
  }
  if (template instanceof Map) {
    const item = template.values().next().value;
    return new Map(Object.entries(value).map(([key, entry]) => [key, shape(entry, item)]));
  }
  if (Array.isArray(template)) {
    return Array.isArray(value) ? value.map((entry) => shape(entry, template[0])) : value;
  }
  if (typeof template !== "object") return value;
  const shaped = {};
  const set = (key, item) => {
    if (key === "__proto__") {
      // Defined rather than assigned, so that it stays a plain key.
      Object.defineProperty(shaped, key, { value: item, enumerable: true, writable: true, configurable: true });
    } else {
      shaped[key] = item;
    }
  };
  for (const key of Object.keys(template)) {
    set(key, Object.hasOwn(value, key) ? shape(value[key], template[key]) : template[key]);
  }
  for (const key of Object.keys(value)) {
    if (!Object.hasOwn(shaped, key)) set(key, value[key]);
  }
  return shaped;
}

function describeEvent(event) {
  return `${event.eventType} at position ${event.position} (${event.revision}@${event.stream})`;
}

function failure(event, error) {
  const message = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  const stack = error instanceof Error && error.stack ? `\n${error.stack.trimEnd()}` : "";
  return `${describeEvent(event)}: ${message}${stack}`;
}

/**
 * Makes `apply(state, event, ctx)` a projection and returns the component's exports,
 * `{ describe, partitionKey, handle }`, for the module to export.
 *
 * - source: every event, or `category`/`categories`, or `stream`/`streams`;
 * - `eventTypes`: only events of these types are handed over;
 * - partitioning: `partition: "none"` (one state, the default) or `"stream"`, or
 *   `partitionBy(event)` returning a key (`undefined` or `null` skips the event);
 * - `state()`: a new, empty state (`{}` when absent; `null` keeps no state). Its shape is how
 *   stored states are read back (see `fromJson`).
 *
 * `apply` changes the state in place or returns a new one.
 */
export function projection(definition) {
  const { apply, partitionBy } = definition;
  if (typeof apply !== "function") throw new TypeError("projection needs an apply function");
  const source = sourceOf(definition);
  const partition = definition.partition ?? "none";
  if (!["none", "stream"].includes(partition)) {
    throw new TypeError(`partition is "none" or "stream", not ${JSON.stringify(partition)}`);
  }
  const partitioning = partitionBy ? "custom" : partition === "stream" ? "by-stream" : "none";
  const newState = definition.state === null ? () => null : (definition.state ?? (() => ({})));

  function describe() {
    return {
      source,
      eventTypes: [...(definition.eventTypes ?? [])],
      partitioning: { tag: partitioning },
    };
  }

  function partitionKey(raw) {
    if (!partitionBy) return undefined;
    const event = new Event(raw);
    try {
      return partitionBy(event) ?? undefined;
    } catch (error) {
      // The call has no way to return an error: say why on stderr, then trap.
      console.error(failure(event, error));
      throw error;
    }
  }

  function handle(events) {
    const ctx = new Ctx();
    // Per partition: { state, stored bytes or undefined }.
    const states = new Map();
    for (const raw of events) {
      const event = new Event(raw);
      let key;
      if (partitioning === "custom") {
        try {
          key = partitionBy(event);
        } catch (error) {
          throw failure(event, error);
        }
        if (key === undefined || key === null) continue;
      } else {
        key = partitioning === "by-stream" ? raw.stream : "";
      }
      let loaded = states.get(key);
      if (loaded === undefined) {
        const stored = host.getState(key);
        let state;
        try {
          // A new state per partition is also the shape of its stored one.
          state = stored === undefined ? newState() : fromJson(stored, newState());
        } catch (error) {
          throw `the stored state of partition ${JSON.stringify(key)} does not parse: ${error}`;
        }
        loaded = { state, stored };
        states.set(key, loaded);
      }
      ctx.current = event.position;
      let changed;
      try {
        changed = apply(loaded.state, event, ctx);
      } catch (error) {
        // A thrown string is the call's error: the projection faults at this event.
        throw failure(event, error);
      }
      if (changed !== undefined) loaded.state = changed;
    }
    let untouched;
    try {
      untouched = write(newState());
    } catch (error) {
      throw `cannot encode a new state: ${error}`;
    }
    for (const [key, { state, stored }] of states) {
      let text;
      try {
        text = write(state);
      } catch (error) {
        throw `cannot encode the state of partition ${JSON.stringify(key)}: ${error}`;
      }
      if (stored === undefined ? text !== untouched : text !== decoder.decode(stored)) {
        host.setState(key, encoder.encode(text));
      }
    }
  }

  return { describe, partitionKey, handle };
}

function sourceOf({ category, categories, stream, streams }) {
  if (category !== undefined || categories !== undefined) {
    return { tag: "categories", val: [...(categories ?? []), ...(category ? [category] : [])] };
  }
  if (stream !== undefined || streams !== undefined) {
    return { tag: "streams", val: [...(streams ?? []), ...(stream ? [stream] : [])] };
  }
  return { tag: "all" };
}
