//! The configuration's tests: layering, validation, secrets, and the
//! bundled file against the built-in defaults.

mod unit {
    use super::super::secrets::*;
    use super::super::settings::*;
    use super::super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    struct FakeEnv(HashMap<String, String>);

    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
        fn vars(&self) -> Vec<(String, String)> {
            self.0.clone().into_iter().collect()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> FakeEnv {
        FakeEnv(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn settings(pairs: &[(&str, &str)], o: Overrides) -> Result<Settings, ConfigError> {
        let e = env(pairs);
        Settings::from_raw(RawConfig::load(&o, &e)?, &e)
    }

    fn bad_key(pairs: &[(&str, &str)]) -> String {
        match settings(pairs, Overrides::default()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{pairs:?} was accepted"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let s = settings(&[("POD_NAME", "pod-1")], Overrides::default()).unwrap();
        assert_eq!(s.daemon.consumer, "pod-1");
        assert_eq!(s.daemon.batch_size, 1000);
        assert_eq!(s.namespace.partition(0).input, "tidemark:{default}:in");
        assert_eq!(s.partitions, None);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn layering_env_then_flags() {
        let pairs = [
            ("TIDEMARK__DAEMON__BATCH_SIZE", "250"),
            ("TIDEMARK__DAEMON__GROUPS", "billing,mail"),
            ("TIDEMARK__NAMESPACE", "envns"),
            ("TIDEMARK__DAEMON__CLAIM_IDLE", "5s"),
            ("REDIS_URL", "redis://10.0.0.1:6380"),
            ("POD_NAME", "pod-1"),
        ];
        let s = settings(&pairs, Overrides::default()).unwrap();
        assert_eq!(s.daemon.batch_size, 250);
        assert_eq!(s.daemon.groups, ["billing", "mail"]);
        assert_eq!(s.namespace.name(), "envns");
        assert_eq!(s.daemon.claim_idle, Duration::from_secs(5));
        assert_eq!(s.redis_display, "redis://10.0.0.1:6380");

        let o = Overrides {
            namespace: Some("flagns".into()),
            consumer: Some("me".into()),
            groups: vec!["g".into()],
            redis_url: Some("redis://127.0.0.1:1".into()),
            ..Overrides::default()
        };
        let s = settings(&pairs, o).unwrap();
        assert_eq!(s.namespace.name(), "flagns");
        assert_eq!(s.daemon.consumer, "me");
        assert_eq!(s.daemon.groups, ["g"]);
        assert_eq!(s.redis_display, "redis://127.0.0.1:1");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("TIDEMARK__DAEMON__BATCH_SIZE", "0", "daemon.batch_size"),
            ("TIDEMARK__CONSUME__PREFETCH", "10001", "consume.prefetch"),
            ("TIDEMARK__DAEMON__BATCH_SIZE", "100000", "daemon.batch_size"),
            ("TIDEMARK__DAEMON__RELEASE_CHUNK", "0", "daemon.release_chunk"),
            ("TIDEMARK__LOG__FORMAT", "xml", "log.format"),
            ("REDIS_URL", "not a url", "redis.url"),
            ("REDIS_URL", "http://x", "redis.url"),
            ("TIDEMARK__DAEMON__CLAIM_IDLE", "0s", "daemon.claim_idle"),
            ("TIDEMARK__DAEMON__BLOCK", "soon", "block"),
            ("TIDEMARK__NAMESPACE", "a}b", "namespace"),
            ("TIDEMARK__DAEMON__NOPE", "1", "nope"),
            ("TIDEMARK__CONSUME__FROM", "end", "consume.from"),
        ];
        for (k, v, key) in cases {
            let msg = bad_key(&[(k, v), ("POD_NAME", "p")]);
            assert!(msg.contains(key), "{k}={v}: {msg:?} does not name {key}");
        }
    }

    #[test]
    fn summary_interval_default_and_off() {
        let s = settings(&[("POD_NAME", "p")], Overrides::default()).unwrap();
        assert_eq!(s.log_summary_interval, Some(Duration::from_secs(10)));
        let s =
            settings(&[("POD_NAME", "p"), ("TIDEMARK__LOG__SUMMARY_INTERVAL", "1m")], Overrides::default()).unwrap();
        assert_eq!(s.log_summary_interval, Some(Duration::from_secs(60)));
        let s =
            settings(&[("POD_NAME", "p"), ("TIDEMARK__LOG__SUMMARY_INTERVAL", "0s")], Overrides::default()).unwrap();
        assert_eq!(s.log_summary_interval, None);
        assert!(
            bad_key(&[("POD_NAME", "p"), ("TIDEMARK__LOG__SUMMARY_INTERVAL", "often")]).contains("summary_interval")
        );
    }

    #[test]
    fn http_addr_default_env_flag_and_off() {
        let s = settings(&[("POD_NAME", "p")], Overrides::default()).unwrap();
        assert_eq!(s.http_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(s.http_addr_is_default);
        let s = settings(&[("POD_NAME", "p"), ("TIDEMARK__HTTP__ADDR", "0.0.0.0:8080")], Overrides::default()).unwrap();
        assert_eq!(s.http_addr, Some("0.0.0.0:8080".parse().unwrap()));
        assert!(!s.http_addr_is_default);
        // The default address, written out, is configured: taken, it is an error.
        let o = Overrides { http_addr: Some(DEFAULT_HTTP_ADDR.into()), ..Overrides::default() };
        assert!(!settings(&[("POD_NAME", "p")], o).unwrap().http_addr_is_default);
        for off in ["off", "OFF", ""] {
            let o = Overrides { http_addr: Some(off.into()), ..Overrides::default() };
            let s = settings(&[("POD_NAME", "p"), ("TIDEMARK__HTTP__ADDR", "0.0.0.0:8080")], o).unwrap();
            assert_eq!(s.http_addr, None, "--http {off:?}");
        }
        let o = Overrides { http_addr: Some("[::1]:9000".into()), ..Overrides::default() };
        assert_eq!(settings(&[("POD_NAME", "p")], o).unwrap().http_addr, Some("[::1]:9000".parse().unwrap()));
        for bad in ["localhost:9464", "9464", "127.0.0.1", "127.0.0.1:99999", "on"] {
            let o = Overrides { http_addr: Some(bad.into()), ..Overrides::default() };
            match settings(&[("POD_NAME", "p")], o) {
                Err(e) => assert!(e.to_string().contains("http.addr"), "{bad:?}: {e}"),
                Ok(s) => panic!("--http {bad:?} was accepted as {:?}", s.http_addr),
            }
        }
    }

    #[test]
    fn password_never_shown() {
        let s =
            settings(&[("REDIS_URL", "redis://app:s3cret@127.0.0.1:6379/0"), ("POD_NAME", "p")], Overrides::default())
                .unwrap();
        assert!(!s.redis_display.contains("s3cret"));
        assert!(s.redis_display.contains("app:***@"));
        let msg = bad_key(&[("REDIS_URL", "redis://app:s3cret@[bad/0")]);
        assert!(!msg.contains("s3cret"), "{msg}");
        // The typo stays visible; only the password is masked.
        assert!(msg.contains("redis://app:***@[bad/0"), "{msg}");
        assert_eq!(redact_url("unix:///run/redis.sock?db=2&pass=s3cret"), "unix:///run/redis.sock?db=2&pass=***");
    }

    #[test]
    fn unparseable_urls_are_shown_with_only_the_password_masked() {
        for (written, shown) in [
            ("redis://app:s3cret@[bad/0", "redis://app:***@[bad/0"),
            ("redis://:s3:cr@et@127.0.0.1:63 79", "redis://:***@127.0.0.1:63 79"),
            ("redis://[::1:6379/0", "redis://[::1:6379/0"),
            ("redis://127.0.0.1:99999", "redis://127.0.0.1:99999"),
            ("redis://app:s3cret/0", "redis://app:***/0"),
            ("redis://app@[::1:6379", "redis://app@[::1:6379"),
            ("unix:///run/redis.sock?pass=s3cret&db=x y", "unix:///run/redis.sock?pass=***&db=x y"),
            ("s3cret@host", "***@host"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_unparsed(written), shown, "{written}");
        }
        assert_eq!(redact_url("redis://app:s3cret@[bad/0"), "redis://app:***@[bad/0");
    }

    #[test]
    fn dedup_window_is_off_by_default_and_bounded() {
        let s = settings(&[("POD_NAME", "p")], Overrides::default()).unwrap();
        assert_eq!(s.daemon.dedup_window, None);
        let s =
            settings(&[("POD_NAME", "p"), ("TIDEMARK__DAEMON__DEDUP_WINDOW", "10m")], Overrides::default()).unwrap();
        assert_eq!(s.daemon.dedup_window, Some(Duration::from_secs(600)));
        for bad in ["31d", "soon"] {
            let msg = bad_key(&[("POD_NAME", "p"), ("TIDEMARK__DAEMON__DEDUP_WINDOW", bad)]);
            assert!(msg.contains("dedup_window"), "{bad}: {msg}");
        }
        assert_eq!(s.daemon.memory_check_interval, Duration::from_secs(60));
        assert!(bad_key(&[("TIDEMARK__DAEMON__MEMORY_CHECK_INTERVAL", "0s")]).contains("memory_check_interval"));
    }

    #[test]
    fn sentinel_urls_and_passwords() {
        let url = "redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26380/mymaster/1";
        let s = settings(&[("REDIS_URL", url), ("POD_NAME", "p")], Overrides::default()).unwrap();
        assert!(s.redis.is_sentinel());
        assert_eq!(s.redis_display, "redis+sentinel://app:***@10.0.0.1:26379,10.0.0.2:26380/mymaster/1");
        let settings_of = s.redis.client().get_connection_info().redis_settings().clone();
        assert_eq!((settings_of.password(), settings_of.db()), (Some("s3cret"), 1), "the data node's password and db");
        // REDIS_PASSWORD replaces the data nodes' password; the Sentinels'
        // comes from its own setting or variable.
        let s = settings(
            &[
                ("REDIS_URL", url),
                ("REDIS_PASSWORD", "other"),
                ("REDIS_SENTINEL_PASSWORD", "sentinel-pw"),
                ("TIDEMARK__REDIS__SENTINEL_PASSWORD", "file-pw"),
                ("POD_NAME", "p"),
            ],
            Overrides::default(),
        )
        .unwrap();
        assert_eq!(s.redis.client().get_connection_info().redis_settings().password(), Some("other"));
        assert!(!format!("{s:?}").contains("sentinel-pw"), "never shown");
        for (pairs, key) in [
            (&[("REDIS_URL", "redis+sentinel://s1:1")][..], "redis.url"),
            (&[("REDIS_URL", "redis+sentinel://s1:1/m"), ("TIDEMARK__REDIS__MODE", "cluster")][..], "redis.mode"),
            (&[("TIDEMARK__REDIS__SENTINEL_PASSWORD", "pw")][..], "redis.sentinel_password"),
        ] {
            let msg = bad_key(pairs);
            assert!(msg.contains(key), "{pairs:?}: {msg}");
        }
    }

    #[test]
    fn tls_files_need_a_rediss_url_and_each_other() {
        let cases = [
            ("redis://h:1", "TIDEMARK__REDIS__TLS_CA_FILE", "redis.tls_ca_file: needs a rediss:// URL"),
            ("rediss://h:1", "TIDEMARK__REDIS__TLS_CERT_FILE", "redis.tls_key_file: must be set with"),
            ("rediss://h:1", "TIDEMARK__REDIS__TLS_KEY_FILE", "redis.tls_cert_file: must be set with"),
        ];
        for (url, key, message) in cases {
            let msg = bad_key(&[("REDIS_URL", url), (key, "/nonexistent.pem"), ("POD_NAME", "p")]);
            assert!(msg.contains(message), "{url} {key}: {msg}");
        }
    }
}

mod bundled_file {
    use super::super::*;
    use std::path::PathBuf;

    /// `config/tidemark.toml` documents every key with its built-in default:
    /// loading it must give exactly the defaults.
    #[test]
    fn bundled_config_matches_defaults() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let text = std::fs::read_to_string(&path).expect("read bundled config");
        let from_file: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("bundled config parses");
        assert_eq!(
            serde_json::to_value(&from_file).unwrap(),
            serde_json::to_value(RawConfig::defaults()).unwrap(),
            "config/tidemark.toml and the built-in defaults disagree"
        );
        // Unset by default, so only a comment can document it.
        for key in ["password_file", "sentinel_password"] {
            assert!(text.contains(key), "redis.{key} is not documented in the bundled config");
        }
    }
}
