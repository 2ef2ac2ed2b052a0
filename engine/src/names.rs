//! The one rule for the names users give things: streams, projections, sharders, consumer
//! groups and their consumers, connectors.

/// What a name names; each kind has its length limit and reserved forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Stream,
    Projection,
    Sharder,
    Group,
    Consumer,
    Connector,
}

/// Longest stream name, in bytes.
pub const MAX_STREAM_NAME_BYTES: usize = 1024;
/// Longest name of anything else, in bytes.
pub const MAX_NAME_BYTES: usize = 200;

impl Name {
    fn noun(self) -> &'static str {
        match self {
            Name::Stream => "stream",
            Name::Projection => "projection",
            Name::Sharder => "sharder",
            Name::Group => "group",
            Name::Consumer => "consumer",
            Name::Connector => "connector",
        }
    }

    pub fn max_bytes(self) -> usize {
        match self {
            Name::Stream => MAX_STREAM_NAME_BYTES,
            _ => MAX_NAME_BYTES,
        }
    }

    /// Projections, sharders and connectors are one path segment, and `$` names are the system's
    /// projections. (`$` streams are the system's too, but clients read them: writes check.)
    fn is_path_segment(self) -> bool {
        matches!(self, Name::Projection | Name::Sharder | Name::Connector)
    }

    /// Checks `name`: 1 to [`Name::max_bytes`] bytes of UTF-8 without control characters, and
    /// for projections, sharders and connectors no leading `$` and no `/`.
    pub fn check(self, name: &str) -> Result<(), String> {
        let (noun, max) = (self.noun(), self.max_bytes());
        if name.is_empty() || name.len() > max {
            return Err(format!(
                "a {noun} name must be 1 to {max} bytes long, not {}",
                name.len()
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(format!("a {noun} name must not contain control characters"));
        }
        if self.is_path_segment() {
            if name.starts_with('$') {
                return Err(format!(
                    "a {noun} name must not start with $: those belong to the system"
                ));
            }
            if name.contains('/') {
                return Err(format!("a {noun} name must not contain /"));
            }
        }
        Ok(())
    }
}

/// A stream a client may write to or delete: a valid name, not one of the system's (`$…`).
pub fn check_writable_stream(name: &str) -> Result<(), String> {
    Name::Stream.check(name)?;
    if name.starts_with('$') {
        return Err(format!(
            "stream names starting with '$' are reserved for the system: {name:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert!(Name::Stream.check("order-1").is_ok());
        assert!(Name::Stream.check("zürich-1").is_ok());
        assert!(Name::Stream.check("$ce-order").is_ok());
        assert!(Name::Stream.check("a/b").is_ok());
        assert!(Name::Stream.check(&"x".repeat(1024)).is_ok());
        assert!(Name::Stream.check(&"x".repeat(1025)).is_err());
        assert!(Name::Stream.check("").is_err());
        assert!(Name::Stream.check("a\nb").is_err());
        assert!(Name::Projection.check(&"x".repeat(200)).is_ok());
        assert!(Name::Projection.check(&"x".repeat(201)).is_err());
        assert!(Name::Projection.check("$by_category").is_err());
        assert!(Name::Sharder.check("a/b").is_err());
        assert!(Name::Group.check("$weird/but-allowed").is_ok());
        assert!(Name::Consumer.check("worker\t1").is_err());
        assert_eq!(
            Name::Group.check("").unwrap_err(),
            "a group name must be 1 to 200 bytes long, not 0"
        );
    }
}
