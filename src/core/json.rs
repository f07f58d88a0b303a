//! Binary-safe JSON for stream field names and values: valid UTF-8 becomes
//! a JSON string, anything else `{"base64": "…"}` (standard alphabet,
//! padded), so nothing is lost and text stays readable.

use serde_json::Value;

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

    #[test]
    fn text_stays_text_and_other_bytes_are_base64() {
        assert_eq!(bytes(b"order-42"), json!("order-42"));
        assert_eq!(bytes("Grüße".as_bytes()), json!("Grüße"));
        assert_eq!(bytes(&[0x80, 0x00]), json!({"base64": "gAA="}));
    }
}
