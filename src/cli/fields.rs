//! `tidemark add`'s payload: `--field KEY=VALUE`, `--field-file KEY=PATH`
//! and `--json FILE` gathered in the order they were given on the command
//! line, files and stdin (`-`) read before anything connects.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::ArgMatches;
use tidemark::core::json;
use tidemark::core::op::Field;

/// Where one part of the payload comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--field KEY=VALUE`
    Inline(String),
    /// `--field-file KEY=PATH`
    File(String),
    /// `--json FILE`
    Json(PathBuf),
}

/// The sources of `add`'s payload in command-line order. `matches` are the
/// `add` subcommand's (they know where each value was given).
pub fn sources(matches: &ArgMatches) -> Vec<Source> {
    let mut found: Vec<(usize, Source)> = Vec::new();
    let mut collect = |id: &str, make: &dyn Fn(String) -> Source| {
        if let (Some(values), Some(indices)) = (matches.get_raw(id), matches.indices_of(id)) {
            for (value, index) in values.zip(indices) {
                found.push((index, make(value.to_string_lossy().into_owned())));
            }
        }
    };
    collect("fields", &Source::Inline);
    collect("field_files", &Source::File);
    collect("json", &|v| Source::Json(PathBuf::from(v)));
    found.sort_by_key(|(index, _)| *index);
    found.into_iter().map(|(_, s)| s).collect()
}

/// Reads every source (files, and `stdin` for the one `-` allowed) into
/// the payload's fields, in order. Errors name the option at fault.
pub fn gather(sources: &[Source], mut stdin: impl Read) -> Result<Vec<Field>, String> {
    let mut stdin_used: Option<String> = None;
    let mut read = |option: String, path: &Path| -> Result<Vec<u8>, String> {
        if path == Path::new("-") {
            if let Some(first) = stdin_used.replace(option.clone()) {
                return Err(format!("{option}: stdin is already read by {first}"));
            }
            let mut buf = Vec::new();
            stdin.read_to_end(&mut buf).map_err(|e| format!("{option}: cannot read stdin: {e}"))?;
            return Ok(buf);
        }
        std::fs::read(path).map_err(|e| format!("{option}: cannot read {}: {e}", path.display()))
    };
    let mut fields = Vec::new();
    for source in sources {
        match source {
            Source::Inline(pair) => {
                let (k, v) = key_value("--field", pair, "KEY=VALUE")?;
                fields.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
            }
            Source::File(pair) => {
                let (k, path) = key_value("--field-file", pair, "KEY=PATH")?;
                let value = read(format!("--field-file {pair:?}"), Path::new(path))?;
                fields.push((k.as_bytes().to_vec(), value));
            }
            Source::Json(path) => {
                let option = format!("--json {:?}", path.display().to_string());
                let text = read(option.clone(), path)?;
                for (k, v) in json::fields(&text).map_err(|e| format!("{option}: {e}"))? {
                    if is_reserved(&k) {
                        let name = String::from_utf8_lossy(&k);
                        return Err(format!("{option}: field `{name}` is reserved (op, id and ts)"));
                    }
                    fields.push((k, v));
                }
            }
        }
    }
    Ok(fields)
}

fn is_reserved(name: &[u8]) -> bool {
    matches!(name, b"op" | b"id" | b"ts")
}

/// Splits `KEY=REST` at the first `=`; the key must be non-empty and not
/// reserved.
fn key_value<'a>(option: &str, pair: &'a str, shape: &str) -> Result<(&'a str, &'a str), String> {
    match pair.split_once('=') {
        Some(("", _)) => Err(format!("{option} {pair:?}: the key is empty")),
        Some((k, _)) if is_reserved(k.as_bytes()) => Err(format!("{option} {pair:?}: `{k}` is reserved")),
        Some(kv) => Ok(kv),
        None => Err(format!("{option} {pair:?} is not {shape}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(fields: &[Field]) -> Vec<String> {
        fields.iter().map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect()
    }

    #[test]
    fn order_files_json_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.bin");
        std::fs::write(&file, [0u8, 0xff, b'\n']).unwrap();
        let json = dir.path().join("f.json");
        std::fs::write(&json, r#"{"z": "1", "a": ["x", "y"]}"#).unwrap();
        let sources = [
            Source::Inline("first=a=b".into()),
            Source::Json(json),
            Source::File(format!("blob={}", file.display())),
            Source::File("note=-".into()),
            Source::Inline("last=".into()),
        ];
        let got = gather(&sources, &b"from stdin"[..]).unwrap();
        assert_eq!(names(&got), ["first", "z", "a", "a", "blob", "note", "last"]);
        assert_eq!(got[0].1, b"a=b");
        assert_eq!(got[4].1, [0u8, 0xff, b'\n'], "byte for byte, newline included");
        assert_eq!(got[5].1, b"from stdin");
        assert_eq!(got[6].1, b"");
    }

    #[test]
    fn errors_name_the_option() {
        let cases: [(&[Source], &str); 6] = [
            (&[Source::Inline("novalue".into())], "--field \"novalue\" is not KEY=VALUE"),
            (&[Source::File("id=/etc/hostname".into())], "`id` is reserved"),
            (&[Source::File("k=/no/such/file".into())], "--field-file \"k=/no/such/file\": cannot read /no/such/file"),
            (&[Source::File("a=-".into()), Source::Json("-".into())], "--json \"-\": stdin is already read by"),
            (&[Source::Json("-".into())], "--json \"-\": field \"n\": 7 is a number"),
            (&[Source::File("=x".into())], "the key is empty"),
        ];
        for (sources, says) in cases {
            let stdin: &[u8] = if matches!(sources[0], Source::Json(_)) { br#"{"n": 7}"# } else { b"" };
            let err = gather(sources, stdin).unwrap_err();
            assert!(err.contains(says), "{sources:?}: {err}");
        }
        let err = gather(&[Source::Json("-".into())], &br#"{"ts": "5"}"#[..]).unwrap_err();
        assert!(err.contains("field `ts` is reserved"), "{err}");
    }
}
