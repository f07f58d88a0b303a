//! What a new user trips over in the first hour (issue 10), each checked
//! against real processes: dead letters of `tidemark consume` say why (the
//! end of the command's stderr), a mistyped namespace is reported, big
//! payloads go in from files and stdin, several processes share one host
//! with the default HTTP settings, `consume --from new`, the daemon's
//! periodic summary, and `make run`'s script stopping on SIGTERM.

use std::time::Duration;

use crate::harness::{field, keys, read_stream, run_cli, wait_until, Daemon, RedisServer};

const WAIT: Duration = Duration::from_secs(30);

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `XADD`s an element to `:out` as a daemon releases it.
fn release(conn: &mut redis::Connection, id: &str) -> String {
    redis::cmd("XADD")
        .arg(keys("default").out)
        .arg("*")
        .arg("id")
        .arg(id)
        .arg("ts")
        .arg(1)
        .query(conn)
        .expect("XADD :out")
}

/// A command that fails after writing to stderr: the dead letter's detail
/// ends with the last lines it wrote (bounded), and `dead list` shows them.
#[test]
fn dead_letters_of_consume_end_with_the_commands_stderr() {
    let redis = RedisServer::start();
    let mut conn = redis.sync_conn();
    let url = redis.url();
    // A short traceback for one element, 100 KB of noise then a last line
    // for the other.
    let script = r#"
        if [ "$TIDEMARK_ID" = noisy ]; then
          i=0; while [ $i -lt 2000 ]; do echo "noise line $i ................................................"; i=$((i+1)); done >&2
          echo "the last word" >&2
          exit 3
        fi
        echo "working on $TIDEMARK_ID"
        echo 'Traceback (most recent call last):' >&2
        echo '  File "remind.py", line 14, in <module>' >&2
        echo "KeyError: 'customer'" >&2
        exit 1
    "#;
    let consume = Daemon::spawn(
        &[
            "consume",
            "--redis-url",
            &url,
            "--group",
            "g",
            "--consumer",
            "c",
            "--max-deliveries",
            "2",
            "--claim-idle",
            "300ms",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[],
    );
    consume.wait_log("consuming", WAIT);
    let hello = release(&mut conn, "hello");
    let noisy = release(&mut conn, "noisy");
    wait_until("both elements are dead-lettered", WAIT, || read_stream(&mut conn, &keys("default").dead).len() == 2);
    let dead = read_stream(&mut conn, &keys("default").dead);
    let detail_of = |origin_id: &str| {
        let letter = dead.iter().find(|(_, f)| field(f, "origin_id") == Some(origin_id.as_bytes())).expect("letter");
        String::from_utf8(field(&letter.1, "detail").expect("detail").to_vec()).expect("UTF-8 detail")
    };
    assert_eq!(
        detail_of(&hello),
        "delivery 2 of 2 failed: exited with status 1; last lines of stderr:\n\
         Traceback (most recent call last):\n  File \"remind.py\", line 14, in <module>\nKeyError: 'customer'"
    );
    let detail = detail_of(&noisy);
    assert!(detail.starts_with("delivery 2 of 2 failed: exited with status 3; last lines of stderr:\n…\nnoise line "));
    assert!(detail.ends_with("\nnoise line 1999 ................................................\nthe last word"));
    assert!(detail.len() <= 2000, "bounded: {} bytes", detail.len());
    assert!(detail.len() > 1500, "about 2 KB of stderr kept: {} bytes", detail.len());

    // The table shows the end of each detail.
    let out = run_cli(&["dead", "list", "--redis-url", &url], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let row = |origin_id: &str| table.lines().find(|l| l.contains(origin_id)).unwrap_or_else(|| panic!("{table}"));
    assert!(row(&hello).ends_with("KeyError: 'customer'"), "{table}");
    assert!(row(&noisy).ends_with("the last word"), "{table}");
    assert!(row(&hello).contains("delivery 2 of 2 failed"), "{table}");
}
