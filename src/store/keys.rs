//! The one place where Redis key names are built.
//!
//! A namespace `NS` of `P` partitions (DESIGN §7): with `P = 1` every key
//! carries the hash tag `{NS}` (today's layout, byte for byte); with
//! `P > 1` partition `p` carries `{NS:p}`, so that each partition's keys
//! share one cluster slot and every script touches one slot, while the
//! partitions spread over the cluster. Keys about the namespace as a whole
//! (the meta record, the daemon registry, the leader locks, liveness
//! leases) always carry `{NS}`.

use crate::core::route;

/// The consumer group in which daemons read `:in`.
pub const INPUT_GROUP: &str = "tidemark";

/// A namespace and how it is partitioned: builds the keys of each
/// partition and routes elements to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Prefix of every key (normally `tidemark`).
    prefix: String,
    /// The namespace's name.
    name: String,
    /// How many partitions (1 ..= [`route::MAX_PARTITIONS`]).
    partitions: u16,
}

impl Namespace {
    /// Namespace `name` under `prefix` with `partitions` partitions.
    pub fn new(prefix: &str, name: &str, partitions: u16) -> Self {
        assert!((1..=route::MAX_PARTITIONS).contains(&partitions), "1..=1024 partitions");
        Namespace { prefix: prefix.to_owned(), name: name.to_owned(), partitions }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many partitions.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The same namespace with `partitions` partitions.
    pub fn with_partitions(&self, partitions: u16) -> Namespace {
        Namespace::new(&self.prefix, &self.name, partitions)
    }

    /// The keys of partition `p` (< [`Namespace::partitions`]).
    pub fn partition(&self, p: u16) -> Keys {
        assert!(p < self.partitions, "partition {p} of {}", self.partitions);
        let tag = if self.partitions == 1 { self.name.clone() } else { format!("{}:{p}", self.name) };
        Keys::tagged(&self.prefix, &self.name, &tag, p)
    }

    /// The keys of every partition, in order.
    pub fn all(&self) -> Vec<Keys> {
        (0..self.partitions).map(|p| self.partition(p)).collect()
    }

    /// The partition of element `id`: `crc32(id) mod P`.
    pub fn route(&self, id: &[u8]) -> u16 {
        route::partition_of(id, self.partitions)
    }

    /// The keys of the partition of element `id`.
    pub fn keys_for(&self, id: &[u8]) -> Keys {
        self.partition(self.route(id))
    }

    /// `<prefix>:{NS}`: the stem of the namespace-wide keys.
    fn stem(&self) -> String {
        format!("{}:{{{}}}", self.prefix, self.name)
    }

    /// `<prefix>:{NS}:meta` (hash): the recorded layout (`partitions`).
    pub fn meta(&self) -> String {
        format!("{}:meta", self.stem())
    }

    /// `<prefix>:{NS}:repartition:letters` (hash, only while `tidemark
    /// repartition` runs): `<stream> <old id>` → the new id of a dead
    /// letter that could not keep its id.
    pub fn repartition_letters(&self) -> String {
        format!("{}:repartition:letters", self.stem())
    }

    /// `<prefix>:{NS}:daemons` (sorted set): live daemons, score = when
    /// their registration expires (ms, the Redis server's clock).
    pub fn daemons(&self) -> String {
        format!("{}:daemons", self.stem())
    }
}

/// The keys of one partition of a namespace (with `P = 1`, of the whole
/// namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `:in` — input operations from producers (stream).
    pub input: String,
    /// `:wm` — the watermark (string).
    pub wm: String,
    /// `:sched` — scheduled element ids, score = ts (sorted set).
    pub sched: String,
    /// `:body` — element id → encoded payload (hash).
    pub body: String,
    /// `:out` — released elements (stream).
    pub out: String,
    /// `:dead` — dead letters (stream).
    pub dead: String,
    /// The namespace these keys belong to.
    pub namespace: String,
    /// Which partition (0 with `P = 1`).
    pub partition: u16,
    /// `<prefix>:{NS}` or `<prefix>:{NS:p}`: the stem of this partition's
    /// internal keys.
    stem: String,
    /// `<prefix>:{NS}`: the stem of namespace-wide keys.
    namespace_stem: String,
    /// The key prefix.
    prefix: String,
}

/// The namespace of unpartitioned keys (its partition count is then taken
/// from the namespace's record where it matters).
impl From<Keys> for Namespace {
    fn from(keys: Keys) -> Namespace {
        Namespace::new(&keys.prefix, &keys.namespace, 1)
    }
}

impl Keys {
    /// The keys of namespace `ns` under `prefix` (normally `tidemark`),
    /// not partitioned.
    pub fn new(prefix: &str, ns: &str) -> Self {
        Keys::tagged(prefix, ns, ns, 0)
    }

    fn tagged(prefix: &str, ns: &str, tag: &str, partition: u16) -> Self {
        let key = |suffix: &str| format!("{prefix}:{{{tag}}}:{suffix}");
        Keys {
            input: key("in"),
            wm: key("wm"),
            sched: key("sched"),
            body: key("body"),
            out: key("out"),
            dead: key("dead"),
            namespace: ns.to_owned(),
            partition,
            stem: format!("{prefix}:{{{tag}}}"),
            namespace_stem: format!("{prefix}:{{{ns}}}"),
            prefix: prefix.to_owned(),
        }
    }

    /// The liveness lease of `consumer` in `group` of stream `stream`
    /// (`"in"` or `"out"`): `<prefix>:{NS}:lease:<stream>:<group>:<consumer>`,
    /// one per process whatever the partitions.
    pub fn lease(&self, stream: &str, group: &str, consumer: &str) -> String {
        format!("{}:lease:{stream}:{group}:{consumer}", self.namespace_stem)
    }

    /// A `SCAN … MATCH` pattern for the daemons' liveness leases of every
    /// namespace under this prefix: `<prefix>:{*}:lease:in:tidemark:*`.
    pub fn daemon_leases_everywhere(&self) -> String {
        let mut prefix = String::new();
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                prefix.push('\\');
            }
            prefix.push(c);
        }
        format!("{prefix}:{{*}}:lease:in:{INPUT_GROUP}:*")
    }

    /// The namespace of a key matched by [`Keys::daemon_leases_everywhere`].
    pub fn namespace_of_daemon_lease<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix(":{")?;
        let (ns, tail) = rest.split_once('}')?;
        tail.starts_with(&format!(":lease:in:{INPUT_GROUP}:")).then_some(ns)
    }

    /// A namespace-wide lock named `name`: `<prefix>:{NS}:lock:<name>`
    /// (e.g. `housekeeping`, `clock`).
    pub fn lock(&self, name: &str) -> String {
        format!("{}:lock:{name}", self.namespace_stem)
    }

    /// The ids released lately, with `daemon.dedup_window` (sorted set:
    /// element id → release time, ms): `<stem>:released`.
    pub fn released(&self) -> String {
        format!("{}:released", self.stem)
    }

    /// What `/readyz` writes to check that Redis takes writes (string,
    /// with a short lifetime): `<prefix>:{NS}:probe`.
    pub fn probe(&self) -> String {
        format!("{}:probe", self.namespace_stem)
    }

    /// The owner of this partition's input (string: the owning daemon's
    /// token, with a lifetime): `<stem>:owner`.
    pub fn owner(&self) -> String {
        format!("{}:owner", self.stem)
    }

    /// Clock mode: the ts the clock leader sleeps until (string).
    pub fn clock_next(&self) -> String {
        format!("{}:clock:next", self.stem)
    }

    /// Clock mode: the pub/sub channel that wakes the clock leader early
    /// (one per namespace: channels are not keys, and any node's PUBLISH
    /// reaches a subscriber on any other).
    pub fn wake_channel(&self) -> String {
        format!("{}:wake", self.namespace_stem)
    }
}

/// Why a namespace name cannot be used.
pub fn invalid_namespace(name: &str) -> Option<String> {
    // `orders:3` would share its tag with partition 3 of `orders`.
    let (_, tail) = name.rsplit_once(':')?;
    (!tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit())).then(|| {
        format!("{name:?} ends in `:<number>`, which is how partitions of another namespace are tagged ({{NS:p}})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_hash_tag() {
        let k = Keys::new("tidemark", "default");
        assert_eq!(k.input, "tidemark:{default}:in");
        assert_eq!(k.wm, "tidemark:{default}:wm");
        assert_eq!(k.sched, "tidemark:{default}:sched");
        assert_eq!(k.body, "tidemark:{default}:body");
        assert_eq!(k.out, "tidemark:{default}:out");
        assert_eq!(k.dead, "tidemark:{default}:dead");
        assert_eq!(k.lease("out", "billing", "pod-1"), "tidemark:{default}:lease:out:billing:pod-1");
        assert_eq!(k.lock("housekeeping"), "tidemark:{default}:lock:housekeeping");
        assert_eq!(k.clock_next(), "tidemark:{default}:clock:next");
        assert_eq!(k.wake_channel(), "tidemark:{default}:wake");
        assert_eq!(k.owner(), "tidemark:{default}:owner");
    }

    #[test]
    fn one_partition_is_today_s_layout() {
        let ns = Namespace::new("tidemark", "default", 1);
        assert_eq!(ns.partition(0), Keys::new("tidemark", "default"));
        assert_eq!(ns.meta(), "tidemark:{default}:meta");
        assert_eq!(ns.route(b"anything"), 0);
    }

    #[test]
    fn partitions_carry_their_own_tag() {
        let ns = Namespace::new("tidemark", "orders", 8);
        let k = ns.partition(3);
        assert_eq!(k.input, "tidemark:{orders:3}:in");
        assert_eq!(k.dead, "tidemark:{orders:3}:dead");
        assert_eq!(k.owner(), "tidemark:{orders:3}:owner");
        assert_eq!(k.clock_next(), "tidemark:{orders:3}:clock:next");
        // Namespace-wide keys keep {NS}.
        assert_eq!(k.lease("out", "g", "c"), "tidemark:{orders}:lease:out:g:c");
        assert_eq!(k.lock("clock"), "tidemark:{orders}:lock:clock");
        assert_eq!(ns.meta(), "tidemark:{orders}:meta");
        assert_eq!(ns.daemons(), "tidemark:{orders}:daemons");
        assert_eq!(ns.keys_for(b"order-42").partition, 6);
        assert_eq!(ns.all().len(), 8);
    }

    #[test]
    fn names_that_look_like_a_partition_are_refused() {
        assert!(invalid_namespace("orders:3").is_some());
        assert!(invalid_namespace("a:b:12").is_some());
        assert!(invalid_namespace("orders").is_none());
        assert!(invalid_namespace("orders:eu").is_none());
        assert!(invalid_namespace("orders:").is_none());
    }

    #[test]
    fn daemon_leases_of_every_namespace() {
        let k = Keys::new("tidemark", "default");
        assert_eq!(k.daemon_leases_everywhere(), "tidemark:{*}:lease:in:tidemark:*");
        let lease = Keys::new("tidemark", "orders").lease("in", INPUT_GROUP, "pod-1");
        assert_eq!(k.namespace_of_daemon_lease(&lease), Some("orders"));
        assert_eq!(k.namespace_of_daemon_lease("tidemark:{orders}:lease:out:g:pod-1"), None);
        assert_eq!(k.namespace_of_daemon_lease("other:{orders}:lease:in:tidemark:pod-1"), None);
        assert_eq!(Keys::new("a*b", "x").daemon_leases_everywhere(), "a\\*b:{*}:lease:in:tidemark:*");
    }
}
