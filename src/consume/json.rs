//! The JSON document `tidemark consume` writes to a command's stdin: one
//! object per element, lossless for any bytes.
//!
//! ```text
//! {"id":"order-42","ts":1700000000000,"fields":{"customer":"7","raw":{"base64":"AP8="}}}
//! ```
//!
//! - A byte string (id, field name or value) is a JSON string when it is
//!   valid UTF-8, else `{"base64":"…"}` (standard alphabet, padded).
//! - `fields` maps each field name that is valid UTF-8 to its value, in the
//!   order names first appear; a name that appears more than once maps to an
//!   array of its values, in order.
//! - `pairs` is present only when `fields` cannot say everything (a name
//!   repeats or is not valid UTF-8): every field as a `[name, value]` pair,
//!   in the original order.
//! - The object is followed by one newline.

use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::Serialize;

use super::Element;
use crate::core::op::Field;

/// Encodes `element` as the stdin document (with its trailing newline).
pub fn encode(element: &Element) -> Vec<u8> {
    let fields = Fields::new(&element.fields);
    let doc = Doc {
        id: Bytes(&element.id),
        ts: element.ts,
        pairs: fields.needs_pairs.then_some(Pairs(&element.fields)),
        fields,
    };
    let mut out = serde_json::to_vec(&doc).expect("serializing to memory cannot fail");
    out.push(b'\n');
    out
}

#[derive(Serialize)]
struct Doc<'a> {
    id: Bytes<'a>,
    ts: i64,
    fields: Fields<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pairs: Option<Pairs<'a>>,
}

/// A byte string: a JSON string if valid UTF-8, else `{"base64": …}`.
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("base64", &crate::core::json::base64(self.0))?;
                map.end()
            }
        }
    }
}

/// The UTF-8-named fields grouped by name, in order of first appearance.
struct Fields<'a> {
    groups: Vec<(&'a str, Vec<Bytes<'a>>)>,
    /// Some name repeats or is not UTF-8: `pairs` must be added.
    needs_pairs: bool,
}

impl<'a> Fields<'a> {
    fn new(fields: &'a [Field]) -> Self {
        let mut groups: Vec<(&'a str, Vec<Bytes<'a>>)> = Vec::with_capacity(fields.len());
        let mut needs_pairs = false;
        for (name, value) in fields {
            let Ok(name) = std::str::from_utf8(name) else {
                needs_pairs = true;
                continue;
            };
            // Payloads are small (a handful of fields), so a linear search
            // beats hashing.
            match groups.iter_mut().find(|(n, _)| *n == name) {
                Some((_, values)) => {
                    needs_pairs = true;
                    values.push(Bytes(value));
                }
                None => groups.push((name, vec![Bytes(value)])),
            }
        }
        Fields { groups, needs_pairs }
    }
}

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.groups.len()))?;
        for (name, values) in &self.groups {
            match values.as_slice() {
                [one] => map.serialize_entry(name, one)?,
                many => map.serialize_entry(name, many)?,
            }
        }
        map.end()
    }
}

/// Every field as a `[name, value]` pair, in order.
struct Pairs<'a>(&'a [Field]);

impl Serialize for Pairs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (name, value) in self.0 {
            seq.serialize_element(&[Bytes(name), Bytes(value)])?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::EntryId;

    fn element(id: &[u8], fields: &[(&[u8], &[u8])]) -> Element {
        Element {
            partition: 0,
            entry_id: EntryId { ms: 1, seq: 0 },
            id: id.to_vec(),
            ts: -42,
            fields: fields.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(),
            delivery: 1,
        }
    }

    fn text(e: &Element) -> String {
        String::from_utf8(encode(e)).unwrap()
    }

    #[test]
    fn plain_fields_are_an_object_in_order() {
        let e = element(b"order-42", &[(b"z", b"1"), (b"a", b"\"quoted\"\n"), (b"", b"")]);
        assert_eq!(
            text(&e),
            "{\"id\":\"order-42\",\"ts\":-42,\"fields\":{\"z\":\"1\",\"a\":\"\\\"quoted\\\"\\n\",\"\":\"\"}}\n"
        );
        assert_eq!(text(&element(b"x", &[])), "{\"id\":\"x\",\"ts\":-42,\"fields\":{}}\n");
    }

    #[test]
    fn binary_values_and_ids_are_base64() {
        let e = element(&[0xff, 0], &[(b"raw", &[0, 0xff, 0xfe]), (b"s", "é".as_bytes())]);
        assert_eq!(
            text(&e),
            "{\"id\":{\"base64\":\"/wA=\"},\"ts\":-42,\"fields\":{\"raw\":{\"base64\":\"AP/+\"},\"s\":\"é\"}}\n"
        );
    }

    #[test]
    fn repeated_and_binary_names_add_pairs() {
        let e = element(b"x", &[(b"tag", b"a"), (&[0xc3], b"v"), (b"tag", &[0x80])]);
        assert_eq!(
            text(&e),
            concat!(
                "{\"id\":\"x\",\"ts\":-42,",
                "\"fields\":{\"tag\":[\"a\",{\"base64\":\"gA==\"}]},",
                "\"pairs\":[[\"tag\",\"a\"],[{\"base64\":\"ww==\"},\"v\"],[\"tag\",{\"base64\":\"gA==\"}]]}\n"
            )
        );
    }
}
