//! The secrets and the connection's identity: the Redis URL with its
//! password (from the URL, `redis.password_file` or `REDIS_PASSWORD`), the
//! TLS files read and checked up front, and URLs masked for display.

use std::path::Path;

use super::{invalid, ConfigError, Env, RawRedis};
use crate::store::sentinel::SentinelUrl;

/// Masks the password of a Redis URL: `redis://user:***@host:6379/0`, and
/// the `pass` query parameter of a `unix://` URL. A URL that does not parse
/// is shown as written, with only what could be a password masked, so that
/// the typo stays visible.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query_pairs().any(|(k, _)| k == "pass") {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "pass" { "***".to_owned() } else { v.into_owned() };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => redact_unparsed(url),
    }
}

/// [`redact_url`] for text that is not a URL: the userinfo's part after
/// the first `:` (up to the last `@`; without an `@`, a "port" that is not
/// a number) and every `pass=`/`password=` query value become `***`;
/// everything else is kept.
pub(super) fn redact_unparsed(text: &str) -> String {
    let (scheme, rest) = match text.find("://") {
        Some(i) => text.split_at(i + 3),
        None => ("", text),
    };
    let mut out = scheme.to_owned();
    let rest = match rest.rfind('@') {
        Some(at) => {
            let (userinfo, host) = rest.split_at(at);
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str("***");
                }
                // No scheme: no telling a user from a password.
                None if scheme.is_empty() => out.push_str("***"),
                None => out.push_str(userinfo),
            }
            host
        }
        // `user:password` without `@host`: a "port" that is not a number
        // may be a password.
        None => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind(':') {
                Some(colon) if !rest[colon + 1..end].chars().all(|c| c.is_ascii_digit()) => {
                    out.push_str(&rest[..=colon]);
                    out.push_str("***");
                    &rest[end..]
                }
                _ => rest,
            }
        }
    };
    match rest.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k == "pass" || k == "password" => format!("{k}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
        }
        None => out.push_str(rest),
    }
    out
}

/// The environment variable that may hold the Redis password (for example
/// from a Kubernetes secret); it replaces the URL's password.
pub const REDIS_PASSWORD_ENV: &str = "REDIS_PASSWORD";

/// The environment variable that may hold the Sentinels' password
/// (`redis+sentinel://`); it replaces `redis.sentinel_password`.
pub const REDIS_SENTINEL_PASSWORD_ENV: &str = "REDIS_SENTINEL_PASSWORD";

/// What `redis.url` points at, validated and not connected.
pub(super) enum Target {
    /// A server or a cluster node: its client and custom TLS material.
    Node(redis::Client, Option<redis::TlsCertificates>),
    /// A master that Sentinels monitor: the URL (data-node password
    /// applied), the Sentinels' password and the TLS material.
    Sentinel(SentinelUrl, Option<String>, Option<redis::TlsCertificates>),
}

/// Builds the (unconnected) Redis target from `[redis]`: the URL, the
/// password from `password_file` or `REDIS_PASSWORD`, the Sentinels'
/// password, and the TLS files. Every message masks the passwords.
pub(super) fn redis_target(r: &RawRedis, env: &dyn Env) -> Result<Target, ConfigError> {
    let url = r.url.trim();
    if SentinelUrl::is_sentinel(url) {
        let mut parsed =
            SentinelUrl::parse(url).map_err(|e| invalid("redis.url", format!("{}: {e}", redact_url(url))))?;
        if let Some((_, password)) = password(r, env)? {
            parsed.password = Some(password);
        }
        let sentinel_password = env
            .var(REDIS_SENTINEL_PASSWORD_ENV)
            .map(|p| p.trim_end_matches(['\r', '\n']).to_owned())
            .filter(|p| !p.is_empty())
            .or_else(|| r.sentinel_password.clone().filter(|p| !p.is_empty()));
        let certs = tls_certificates(r, parsed.tls, false)?;
        return Ok(Target::Sentinel(parsed, sentinel_password, certs));
    }
    if r.sentinel_password.as_deref().is_some_and(|p| !p.is_empty()) {
        return Err(invalid("redis.sentinel_password", "needs a redis+sentinel:// or rediss+sentinel:// URL"));
    }
    let mut parsed =
        url::Url::parse(url).map_err(|e| invalid("redis.url", format!("{} is not a URL: {e}", redact_url(url))))?;
    if !matches!(parsed.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
        return Err(invalid(
            "redis.url",
            format!(
                "scheme {:?} is not one of redis, rediss, unix, redis+unix, redis+sentinel, rediss+sentinel",
                parsed.scheme()
            ),
        ));
    }
    if let Some((key, password)) = password(r, env)? {
        if matches!(parsed.scheme(), "redis" | "rediss") {
            parsed.set_password(Some(&password)).map_err(|()| invalid(key, "this URL cannot carry a password"))?;
        } else {
            parsed.query_pairs_mut().append_pair("pass", &password);
        }
    }
    let insecure = parsed.fragment() == Some("insecure");
    match tls_certificates(r, parsed.scheme() == "rediss", insecure)? {
        None => redis::Client::open(parsed.as_str())
            .map(|c| Target::Node(c, None))
            .map_err(|e| invalid("redis.url", format!("{}: {e}", redact_url(url)))),
        Some(certs) => redis::Client::build_with_tls(parsed.as_str(), certs.clone())
            .map(|c| Target::Node(c, Some(certs)))
            .map_err(|e| invalid("redis.tls_ca_file/tls_cert_file/tls_key_file", format!("{}: {e}", redact_url(url)))),
    }
}

/// The password from `redis.password_file` or `REDIS_PASSWORD` (not both),
/// with the key to blame if it cannot be used.
fn password(r: &RawRedis, env: &dyn Env) -> Result<Option<(&'static str, String)>, ConfigError> {
    // A secret written with a trailing newline (`echo`, `--from-file`) must
    // not turn into a different password.
    let from_env = env.var(REDIS_PASSWORD_ENV).map(|p| p.trim_end_matches(['\r', '\n']).to_owned());
    match (&r.password_file, from_env.filter(|p| !p.is_empty())) {
        (Some(_), Some(_)) => {
            Err(invalid("redis.password_file", format!("{REDIS_PASSWORD_ENV} is set too; give the password only once")))
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("redis.password_file", format!("cannot read {}: {e}", path.display())))?;
            let password = text.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(invalid("redis.password_file", format!("{} is empty", path.display())));
            }
            Ok(Some(("redis.password_file", password.to_owned())))
        }
        (None, from_env) => Ok(from_env.map(|p| (REDIS_PASSWORD_ENV, p))),
    }
}

/// The TLS material of `redis.tls_*`, read and checked now so that a wrong
/// file is a configuration error naming its key, not a failed connection.
fn tls_certificates(r: &RawRedis, tls: bool, insecure: bool) -> Result<Option<redis::TlsCertificates>, ConfigError> {
    let files = [
        ("redis.tls_ca_file", &r.tls_ca_file),
        ("redis.tls_cert_file", &r.tls_cert_file),
        ("redis.tls_key_file", &r.tls_key_file),
    ];
    let Some((first, _)) = files.iter().find(|(_, path)| path.is_some()) else {
        return Ok(None);
    };
    if !tls {
        return Err(invalid(first, "needs a rediss:// URL"));
    }
    if insecure && r.tls_ca_file.is_some() {
        return Err(invalid(
            "redis.tls_ca_file",
            "has no effect with #insecure in the URL, which skips certificate checks",
        ));
    }
    let root_cert = match &r.tls_ca_file {
        Some(path) => Some(read_certificates("redis.tls_ca_file", path)?),
        None => None,
    };
    let client_tls = match (&r.tls_cert_file, &r.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read_certificates("redis.tls_cert_file", cert)?,
            client_key: read_private_key("redis.tls_key_file", key)?,
        }),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("redis.tls_key_file", "must be set with redis.tls_cert_file")),
        (None, Some(_)) => return Err(invalid("redis.tls_cert_file", "must be set with redis.tls_key_file")),
    };
    Ok(Some(redis::TlsCertificates { client_tls, root_cert }))
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// A PEM file holding at least one certificate; returns its bytes.
fn read_certificates(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(key, format!("{} holds no PEM certificate", path.display())));
    }
    Ok(pem)
}

/// A PEM file holding a private key; returns its bytes. The message never
/// quotes the file.
fn read_private_key(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let pem = read_file(key, path)?;
    if PrivateKeyDer::from_pem_slice(&pem).is_err() {
        return Err(invalid(key, format!("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())));
    }
    Ok(pem)
}
