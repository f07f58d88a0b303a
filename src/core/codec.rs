//! The payload encoding shared with the Lua scripts: a sequence of byte
//! strings, each encoded as one MessagePack `str` object and concatenated.
//!
//! Redis's built-in `cmsgpack.unpack(blob)` returns such a sequence as Lua
//! varargs, which the scripts pass straight to `XADD` without building a
//! table. `str` is used rather than `bin` because `cmsgpack` rejects `bin`;
//! Lua strings are byte strings, so any bytes round-trip unchanged.

/// Appends one byte string as a MessagePack `str` object.
pub fn push_str(out: &mut Vec<u8>, value: &[u8]) {
    let len = value.len();
    if len < 32 {
        out.push(0xa0 | len as u8);
    } else if len <= u8::MAX as usize {
        out.push(0xd9);
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0xda);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        let len = u32::try_from(len).expect("payload values are limited far below 4 GiB");
        out.push(0xdb);
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(value);
}

/// Appends the header of a MessagePack array of `len` objects (which the
/// caller appends next).
pub fn push_array_len(out: &mut Vec<u8>, len: usize) {
    if len < 16 {
        out.push(0x90 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0xdc);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        let len = u32::try_from(len).expect("script arguments are limited far below 2^32");
        out.push(0xdd);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// Encodes a sequence of byte strings.
pub fn encode<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        push_str(&mut out, v);
    }
    out
}

/// The blob did not hold a sequence of MessagePack `str` objects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed payload encoding at byte {0}")]
pub struct BadEncoding(pub usize);

/// Decodes a blob written by [`encode`].
pub fn decode(mut blob: &[u8]) -> Result<Vec<Vec<u8>>, BadEncoding> {
    let total = blob.len();
    let mut values = Vec::new();
    while let Some((&tag, rest)) = blob.split_first() {
        let at = total - blob.len();
        let (len, rest) = match tag {
            0xa0..=0xbf => ((tag & 0x1f) as usize, rest),
            0xd9 => take_len::<1>(rest).ok_or(BadEncoding(at))?,
            0xda => take_len::<2>(rest).ok_or(BadEncoding(at))?,
            0xdb => take_len::<4>(rest).ok_or(BadEncoding(at))?,
            _ => return Err(BadEncoding(at)),
        };
        if rest.len() < len {
            return Err(BadEncoding(at));
        }
        values.push(rest[..len].to_vec());
        blob = &rest[len..];
    }
    Ok(values)
}

fn take_len<const N: usize>(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<N>()?;
    let len = head.iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
    Some((len, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uses_the_smallest_header() {
        assert_eq!(encode([&b"ab"[..]]), vec![0xa2, b'a', b'b']);
        assert_eq!(encode([&[7u8; 32][..]])[..2], [0xd9, 32]);
        assert_eq!(encode([&[7u8; 256][..]])[..3], [0xda, 1, 0]);
        assert_eq!(encode([&vec![7u8; 65536][..]])[..5], [0xdb, 0, 1, 0, 0]);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode(&[0xc4, 1, 1]), Err(BadEncoding(0)));
        assert_eq!(decode(&[0xa3, b'a']), Err(BadEncoding(0)));
        assert_eq!(decode(&[0xa0, 0xd9]), Err(BadEncoding(1)));
    }

    proptest! {
        #[test]
        fn roundtrips_any_bytes(values in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let blob = encode(values.iter().map(Vec::as_slice));
            prop_assert_eq!(decode(&blob).unwrap(), values);
        }
    }
}
