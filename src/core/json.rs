//! Binary-safe JSON for stream field names and values: valid UTF-8 becomes
//! a JSON string, anything else `{"base64": "…"}` (standard alphabet,
//! padded), so nothing is lost and text stays readable. [`fields`] reads
//! an object of fields written that way (what `tidemark add --json` takes).

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::op::Field;

/// A byte string as JSON: a string if it is valid UTF-8, else
/// `{"base64": "<standard, padded base64>"}`.
pub fn bytes(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_owned()),
        Err(_) => serde_json::json!({ "base64": base64(b) }),
    }
}

/// Standard base64 (RFC 4648 §4) with `=` padding.
pub fn base64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Reads a JSON object of fields, in the object's order: each value is a
/// string, `{"base64": "…"}` for other bytes, or an array of those (the
/// name repeated, once per value; how `tidemark consume` writes repeated
/// names). Other values (numbers, `true`, `null`, nested objects) are
/// refused, so nothing is sent other than as written: quote numbers.
pub fn fields(json: &[u8]) -> Result<Vec<Field>, String> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let fields = de.deserialize_map(FieldsVisitor).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(fields)
}

/// Collects an object's entries in order (a `Map` would sort them).
struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Vec<Field>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of fields, e.g. {\"customer\": \"7\"}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Field>, A::Error> {
        use serde::de::Error as _;
        let mut fields = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            let value: Value = map.next_value()?;
            let values = match value {
                Value::Array(items) => items,
                single => vec![single],
            };
            for v in values {
                let bytes = field_value(&v).map_err(|why| A::Error::custom(format!("field {name:?}: {why}")))?;
                fields.push((name.clone().into_bytes(), bytes));
            }
        }
        Ok(fields)
    }
}

/// One field value: a string, or `{"base64": "…"}`.
fn field_value(v: &Value) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    match v {
        Value::String(s) => Ok(s.clone().into_bytes()),
        Value::Object(o) if o.len() == 1 => match o.get("base64") {
            Some(Value::String(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("{{\"base64\": …}} is not standard padded base64: {e}")),
            _ => Err("an object value must be {\"base64\": \"…\"}".into()),
        },
        Value::Number(n) => Err(format!("{n} is a number; write it as a string: \"{n}\"")),
        Value::Array(_) => Err("arrays of arrays are not field values".into()),
        other => Err(format!("{other} is not a string or {{\"base64\": \"…\"}}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    fn pairs(fields: &[Field]) -> Vec<(String, Vec<u8>)> {
        fields.iter().map(|(k, v)| (String::from_utf8(k.clone()).unwrap(), v.clone())).collect()
    }

    #[test]
    fn fields_keep_order_bytes_and_repeats() {
        let got = fields(br#"{"zeta": "1", "alpha": {"base64": "AP8="}, "tag": ["a", "b"], "e": "", "u": "\u00fc"}"#)
            .unwrap();
        assert_eq!(
            pairs(&got),
            [
                ("zeta".into(), b"1".to_vec()),
                ("alpha".into(), vec![0x00, 0xff]),
                ("tag".into(), b"a".to_vec()),
                ("tag".into(), b"b".to_vec()),
                ("e".into(), Vec::new()),
                ("u".into(), "ü".as_bytes().to_vec()),
            ]
        );
        assert_eq!(fields(b" {} \n").unwrap(), Vec::<Field>::new());
        // What `tidemark consume` writes for an element's fields reads back.
        let out = bytes(&[0x80, 0x00]);
        let doc = serde_json::to_vec(&json!({ "raw": out })).unwrap();
        assert_eq!(pairs(&fields(&doc).unwrap()), [("raw".into(), vec![0x80, 0x00])]);
    }

    #[test]
    fn fields_refuse_what_they_cannot_send_as_written() {
        for (doc, says) in [
            (r#"{"total": 19.90}"#, r#"field "total": 19.9 is a number; write it as a string"#),
            (r#"{"ok": true}"#, r#"field "ok": true is not a string"#),
            (r#"{"x": null}"#, r#"field "x": null is not a string"#),
            (r#"{"x": {"b64": "AA=="}}"#, r#"field "x": an object value must be {"base64""#),
            (r#"{"x": {"base64": "%%"}}"#, "is not standard padded base64"),
            (r#"{"x": [["a"]]}"#, "arrays of arrays"),
            (r#"["a", "b"]"#, "a JSON object of fields"),
            (r#"{"a": "1"} {"b": "2"}"#, "trailing characters"),
            (r#"{"a": "1""#, "EOF"),
        ] {
            let err = fields(doc.as_bytes()).unwrap_err();
            assert!(err.contains(says), "{doc}: {err}");
        }
    }

    #[test]
    fn text_stays_text_and_other_bytes_are_base64() {
        assert_eq!(bytes(b"order-42"), json!("order-42"));
        assert_eq!(bytes("Grüße".as_bytes()), json!("Grüße"));
        assert_eq!(bytes(&[0x80, 0x00]), json!({"base64": "gAA="}));
    }
}
