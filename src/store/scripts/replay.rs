//! `replay.lua`: `tidemark dead replay` sends dead letters back where they
//! came from, each atomically.

use redis::Value;

use super::Scripts;
use crate::store::{Conn, Keys, StoreError};

/// What happened to one examined dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Appended to `:in` with this new entry id.
    ToInput(String),
    /// Appended to `:out` as a fresh entry with this id.
    ToOutput(String),
    /// Left alone: its reason differs from the one asked for.
    Skipped,
    /// Left in `:dead`: an input entry written to the wrong partition, for
    /// the caller to send to its element's partition (see
    /// [`crate::dead`]).
    Route,
    /// Sent to another partition's input (`stream`) with this new entry id.
    Routed {
        /// The input stream.
        stream: String,
        /// The new entry id.
        id: String,
    },
    /// Left in `:dead`: it cannot be replayed (the text says why).
    Invalid(String),
}

/// One examined dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Its entry id in `:dead`.
    pub dead_id: String,
    /// Its reason code (lossy UTF-8).
    pub reason: String,
    /// What happened to it.
    pub outcome: ReplayOutcome,
}

/// One replay script call's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPage {
    /// Letters examined.
    pub examined: usize,
    /// The last examined id (the next page starts after it).
    pub last: Option<String>,
    /// One per examined letter, in id order.
    pub letters: Vec<Replayed>,
}

fn text(v: &Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(StoreError::Reply(format!("replay.lua: expected a string, got {other:?}"))),
    }
}

/// Decodes `replay.lua`'s reply.
fn decode_page(reply: Value) -> Result<ReplayPage, StoreError> {
    let Value::Array(items) = reply else {
        return Err(StoreError::Reply(format!("replay.lua returned {reply:?}")));
    };
    let (head, results) =
        items.split_at_checked(2).ok_or_else(|| StoreError::Reply("replay.lua: short reply".into()))?;
    let examined = match &head[0] {
        Value::Int(n) => usize::try_from(*n).unwrap_or(0),
        other => return Err(StoreError::Reply(format!("replay.lua: bad count {other:?}"))),
    };
    let last = Some(text(&head[1])?).filter(|l| !l.is_empty());
    let letters = results
        .chunks(4)
        .map(|q| {
            let [id, outcome, reason, detail] = q else {
                return Err(StoreError::Reply("replay.lua: incomplete result".into()));
            };
            let detail = text(detail)?;
            let outcome = match text(outcome)?.as_str() {
                "in" => ReplayOutcome::ToInput(detail),
                "out" => ReplayOutcome::ToOutput(detail),
                "skipped" => ReplayOutcome::Skipped,
                "route" => ReplayOutcome::Route,
                _ => ReplayOutcome::Invalid(detail),
            };
            Ok(Replayed { dead_id: text(id)?, reason: text(reason)?, outcome })
        })
        .collect::<Result<_, _>>()?;
    Ok(ReplayPage { examined, last, letters })
}

impl Scripts {
    /// Replays up to `count` dead letters with ids from `start` (XRANGE
    /// syntax) to `end` (inclusive) whose reason is `reason` (any if `None`),
    /// each atomically (append to its origin stream + delete from `:dead`).
    pub async fn replay_page(
        &self,
        conn: &mut Conn,
        keys: &Keys,
        start: &str,
        end: &str,
        count: usize,
        reason: Option<&str>,
    ) -> Result<ReplayPage, StoreError> {
        let reply: Value = self
            .sources
            .replay
            .key(&keys.dead)
            .key(&keys.input)
            .key(&keys.out)
            .arg(start)
            .arg(end)
            .arg(count)
            .arg(reason.unwrap_or(""))
            .invoke_async(conn)
            .await?;
        decode_page(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_replay_replies() {
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Int(3),
            s("9-0"),
            s("7-0"),
            s("in"),
            s("bad_ts"),
            s("10-0"),
            s("8-0"),
            s("skipped"),
            s("too_large"),
            s(""),
            s("9-0"),
            s("invalid"),
            s("x"),
            s("unknown origin"),
        ]);
        let page = decode_page(reply).unwrap();
        assert_eq!(page.examined, 3);
        assert_eq!(page.last.as_deref(), Some("9-0"));
        assert_eq!(
            page.letters.iter().map(|l| l.outcome.clone()).collect::<Vec<_>>(),
            [
                ReplayOutcome::ToInput("10-0".into()),
                ReplayOutcome::Skipped,
                ReplayOutcome::Invalid("unknown origin".into())
            ]
        );
        assert!(decode_page(Value::Array(vec![Value::Int(0)])).is_err());
        let empty = decode_page(Value::Array(vec![Value::Int(0), s("")])).unwrap();
        assert_eq!((empty.examined, empty.last, empty.letters.len()), (0, None, 0));
    }
}
