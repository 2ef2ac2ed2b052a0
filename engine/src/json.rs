//! JSON read as JSON Schema reads it: a number with a zero fraction (`18973.0`) is an integer,
//! so a body the API documents with `"type": "integer"` fields is accepted whichever way the
//! client's encoder writes whole numbers.

use serde::de::DeserializeOwned;
use serde_json::{Number, Value};

/// Parses `bytes` into `T`, reading whole-valued floats as integers.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    let mut value: Value = serde_json::from_slice(bytes)?;
    integers(&mut value);
    serde_json::from_value(value)
}

fn integers(value: &mut Value) {
    match value {
        Value::Number(number) => {
            if let Some(float) = number.as_f64().filter(|_| number.is_f64())
                && float.fract() == 0.0
            {
                // `u64::MAX as f64` is 2^64, just past the largest u64.
                let whole = if float >= 0.0 && float < u64::MAX as f64 {
                    Some(Number::from(float as u64))
                } else if float < 0.0 && float >= i64::MIN as f64 {
                    Some(Number::from(float as i64))
                } else {
                    None
                };
                if let Some(whole) = whole {
                    *number = whole;
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integers),
        Value::Object(fields) => fields.values_mut().for_each(integers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_floats_read_as_integers() {
        let read: Vec<u64> = from_slice(b"[18973.0, 7, 0.0]").unwrap();
        assert_eq!(read, [18973, 7, 0]);
        let negative: i64 = from_slice(b"-3.0").unwrap();
        assert_eq!(negative, -3);
        assert!(from_slice::<u64>(b"1.5").is_err());
        let kept: f64 = from_slice(b"2.5").unwrap();
        assert_eq!(kept, 2.5);
    }
}
