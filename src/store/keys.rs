//! The one place where Redis key names are built. Every key of a namespace
//! carries the hash tag `{NS}` so that each script touches one cluster slot.

/// The keys of one namespace.
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
    /// The prefix of every key (normally `tidemark`).
    prefix: String,
    /// `<prefix>:{NS}`: the stem of internal keys.
    stem: String,
}

impl Keys {
    /// Keys for namespace `ns` under `prefix` (normally `tidemark`).
    pub fn new(prefix: &str, ns: &str) -> Self {
        let key = |suffix: &str| format!("{prefix}:{{{ns}}}:{suffix}");
        Keys {
            input: key("in"),
            wm: key("wm"),
            sched: key("sched"),
            body: key("body"),
            out: key("out"),
            dead: key("dead"),
            namespace: ns.to_owned(),
            prefix: prefix.to_owned(),
            stem: format!("{prefix}:{{{ns}}}"),
        }
    }

    /// The liveness lease of `consumer` in `group` of stream `stream`
    /// (`"in"` or `"out"`): `<prefix>:{NS}:lease:<stream>:<group>:<consumer>`.
    pub fn lease(&self, stream: &str, group: &str, consumer: &str) -> String {
        format!("{}:lease:{stream}:{group}:{consumer}", self.stem)
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

    /// A lock named `name`: `<prefix>:{NS}:lock:<name>` (e.g. `housekeeping`, `clock`).
    pub fn lock(&self, name: &str) -> String {
        format!("{}:lock:{name}", self.stem)
    }

    /// Clock mode: the ts the clock leader sleeps until (string).
    pub fn clock_next(&self) -> String {
        format!("{}:clock:next", self.stem)
    }

    /// Clock mode: the pub/sub channel that wakes the clock leader early.
    pub fn wake_channel(&self) -> String {
        format!("{}:wake", self.stem)
    }
}

/// The consumer group in which daemons read `:in`.
pub const INPUT_GROUP: &str = "tidemark";

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
        assert_eq!(k.daemon_leases_everywhere(), "tidemark:{*}:lease:in:tidemark:*");
        let lease = Keys::new("tidemark", "orders").lease("in", INPUT_GROUP, "pod-1");
        assert_eq!(k.namespace_of_daemon_lease(&lease), Some("orders"));
        assert_eq!(k.namespace_of_daemon_lease("tidemark:{orders}:lease:out:g:pod-1"), None);
        assert_eq!(k.namespace_of_daemon_lease("other:{orders}:lease:in:tidemark:pod-1"), None);
        assert_eq!(Keys::new("a*b", "x").daemon_leases_everywhere(), "a\\*b:{*}:lease:in:tidemark:*");
    }
}
