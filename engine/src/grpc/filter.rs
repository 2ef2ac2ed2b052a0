//! Server-side filters of `$all` reads and subscriptions: by stream name or event type, with
//! prefixes or a regular expression. EventStoreDB's clients send .NET expressions, look-arounds
//! included (the Python client excludes system events with a negative look-ahead), so they are
//! matched with `fancy-regex`.

use fancy_regex::{Regex, RegexBuilder};
use tonic::Status;

use super::proto::event_store::client::streams::read_req::options::{
    FilterOptions, filter_options,
};
use crate::store::{AllFilter, RecordedEvent};

/// Longest expression a filter may have.
const MAX_REGEX_BYTES: usize = 4096;
/// Backtracking steps one match may take: a subscriber's expression runs for every event of the
/// log, so one that backtracks without end would take the server's threads.
const BACKTRACK_LIMIT: usize = 10_000;

/// A filter: prefixes, which the store applies as it scans (`AllFilter`, the HTTP API's), or a
/// regular expression, applied here.
pub struct EventFilter {
    /// The prefixes; with an expression, every record.
    prefixes: AllFilter,
    expression: Option<Expression>,
    /// A filtered subscription sends a checkpoint after scanning this many events.
    checkpoint_interval: u64,
}

struct Expression {
    /// Match event types (otherwise stream names).
    on_type: bool,
    regex: Box<Regex>,
}

impl EventFilter {
    pub fn new(options: FilterOptions) -> Result<EventFilter, Status> {
        let (on_type, expression) = match options.filter {
            Some(filter_options::Filter::StreamIdentifier(expression)) => (false, expression),
            Some(filter_options::Filter::EventType(expression)) => (true, expression),
            None => {
                return Err(Status::invalid_argument(
                    "a filter is on stream names or event types",
                ));
            }
        };
        let mut prefixes = AllFilter {
            include_system: true,
            ..AllFilter::default()
        };
        let regex = if !expression.prefix.is_empty() || expression.regex.is_empty() {
            if on_type {
                prefixes.type_prefixes = expression.prefix;
            } else {
                prefixes.stream_prefixes = expression.prefix;
            }
            None
        } else {
            if expression.regex.len() > MAX_REGEX_BYTES {
                return Err(Status::invalid_argument(format!(
                    "a filter's expression may be at most {MAX_REGEX_BYTES} bytes"
                )));
            }
            let regex = RegexBuilder::new(&expression.regex)
                .backtrack_limit(BACKTRACK_LIMIT)
                .build()
                .map_err(|error| {
                    Status::invalid_argument(format!(
                        "{:?} is not a regular expression: {error}",
                        expression.regex
                    ))
                })?;
            Some(Expression {
                on_type,
                regex: Box::new(regex),
            })
        };
        let window = match options.window {
            Some(filter_options::Window::Max(max)) => max.max(1),
            Some(filter_options::Window::Count(_)) | None => 1,
        };
        let multiplier = options.checkpoint_interval_multiplier.max(1);
        Ok(EventFilter {
            prefixes,
            expression: regex,
            checkpoint_interval: u64::from(window) * u64::from(multiplier),
        })
    }

    /// Whether `event` passes, prefixes and expression.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        self.prefixes.matches(&event.stream, &event.event_type) && self.matches_expression(event)
    }

    /// Whether `event` passes the expression, for records the store has already filtered by
    /// [`EventFilter::store_filter`].
    pub fn matches_expression(&self, event: &RecordedEvent) -> bool {
        let Some(expression) = &self.expression else {
            return true;
        };
        let subject = if expression.on_type {
            &event.event_type
        } else {
            &event.stream
        };
        // An expression too costly to evaluate (backtracking limit) matches nothing.
        expression.regex.is_match(subject).unwrap_or(false)
    }

    pub fn checkpoint_interval(&self) -> u64 {
        self.checkpoint_interval
    }

    /// What the store applies as it scans `$all`: the prefixes (every record when there are none).
    pub fn store_filter(&self) -> &AllFilter {
        &self.prefixes
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::event_store::client::streams::read_req::options::filter_options::Expression;
    use super::*;

    fn event(stream: &str, event_type: &str) -> RecordedEvent {
        RecordedEvent {
            stream: stream.into(),
            revision: 0,
            position: 0,
            id: uuid::Uuid::nil(),
            event_type: event_type.into(),
            data: Vec::new(),
            binary: true,
            metadata: Vec::new(),
            created_ms: 0,
            link: None,
        }
    }

    fn on_types(regex: &str, prefix: &[&str]) -> EventFilter {
        EventFilter::new(FilterOptions {
            filter: Some(filter_options::Filter::EventType(Expression {
                regex: regex.into(),
                prefix: prefix.iter().map(|p| p.to_string()).collect(),
            })),
            window: Some(filter_options::Window::Max(30)),
            checkpoint_interval_multiplier: 5,
        })
        .unwrap()
    }

    #[test]
    fn the_python_clients_exclusion_of_system_events_works() {
        let filter = on_types(r"^(?!(\$.+$|PersistentConfig\d+$|Result$))", &[]);
        assert!(filter.matches(&event("order-1", "OrderPlaced")));
        assert!(!filter.matches(&event("$$order-1", "$metadata")));
        assert!(!filter.matches(&event("x", "PersistentConfig1")));
        assert_eq!(filter.checkpoint_interval(), 150);
    }

    #[test]
    fn prefixes_and_streams() {
        let filter = on_types("", &["Order", "Invoice"]);
        assert!(filter.matches(&event("a", "OrderPlaced")));
        assert!(!filter.matches(&event("a", "Shipped")));
        let streams = EventFilter::new(FilterOptions {
            filter: Some(filter_options::Filter::StreamIdentifier(Expression {
                regex: "^order-[0-9]+$".into(),
                prefix: Vec::new(),
            })),
            window: None,
            checkpoint_interval_multiplier: 0,
        })
        .unwrap();
        assert!(streams.matches(&event("order-12", "x")));
        assert!(!streams.matches(&event("order-x", "x")));
        assert!(
            EventFilter::new(FilterOptions {
                filter: Some(filter_options::Filter::EventType(Expression {
                    regex: "(".into(),
                    prefix: Vec::new(),
                })),
                window: None,
                checkpoint_interval_multiplier: 1,
            })
            .is_err()
        );
    }
}
