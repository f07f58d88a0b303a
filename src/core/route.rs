//! Which partition an element belongs to (DESIGN §7): `crc32(id) mod P`,
//! with CRC-32 as in zlib and IEEE 802.3 over the id's raw bytes (Python
//! `zlib.crc32`, Go `crc32.ChecksumIEEE`, Java `java.util.zip.CRC32`), and
//! which Redis Cluster slot a key hashes to.

/// Most partitions a namespace may have.
pub const MAX_PARTITIONS: u16 = 1024;

/// The CRC-32 (IEEE) of `id`, as producers in any language compute it.
pub fn crc32(id: &[u8]) -> u32 {
    crc32fast::hash(id)
}

/// The partition of element `id` in a namespace of `partitions` (≥ 1).
pub fn partition_of(id: &[u8], partitions: u16) -> u16 {
    debug_assert!(partitions >= 1);
    (crc32(id) % u32::from(partitions.max(1))) as u16
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag
/// (the part between the first `{` and the next `}`, if non-empty), modulo
/// 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(tagged) % 16384
}

/// CRC-16/XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster
/// uses. Hand-written: eight lines, where a crate would bring a table.
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_test_vectors_of_the_design() {
        assert_eq!(crc32(b"order-42"), 1_475_806_942);
        assert_eq!(partition_of(b"order-42", 8), 6);
        assert_eq!(partition_of(b"order-42", 16), 14);
        assert_eq!(crc32(b"el-0000007"), 3_001_235_137);
        assert_eq!(partition_of(b"el-0000007", 8), 1);
        assert_eq!(crc32(b""), 0);
        assert_eq!(partition_of(b"", 5), 0);
        assert_eq!(partition_of(b"anything", 1), 0);
        // zlib's check value.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn slots_follow_redis_cluster() {
        // Values from `CLUSTER KEYSLOT` and the Redis Cluster specification.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"{user1000}.followers"));
        assert_eq!(key_slot(b"tidemark:{orders:3}:in"), key_slot(b"orders:3"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"), "an empty tag hashes the whole key");
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }
}
