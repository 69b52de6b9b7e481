//! The key digests of logs and spans are keyed with a secret: processes given the same
//! one (in code, or through `IDEMPOTENT_KEY_DIGEST_SECRET`) agree on a key's digest;
//! processes with other secrets, or none, do not.
//!
//! Each process fixes its secret once, so the other processes are this test binary run
//! again, as children, for the one test that prints a digest.

use std::process::Command;

use idempotent_runtime::{ConfigError, KeyDigest, StoreKey, DIGEST_SECRET_ENV};

/// Set by the parent in a child's environment: the child prints its digest.
const CHILD: &str = "IDEMPOTENT_TEST_DIGEST_CHILD";
/// What the child prints its digest after.
const PRINTED: &str = "digest=";

fn digest_of_the_key() -> String {
    StoreKey::new("payments", "order-7", 255)
        .expect("a key")
        .digest()
        .to_string()
}

/// The digest a child process computes, with `secret` in its environment (or none).
fn childs_digest(secret: Option<&str>) -> String {
    let mut child = Command::new(std::env::current_exe().expect("the test binary"));
    child
        .args(["--exact", "child_prints_its_digest", "--nocapture"])
        .env(CHILD, "1")
        // The harder case for reading the digest back: run single-threaded (as with one
        // CPU, or this set by CI), libtest prints the test's name on the digest's line.
        .env("RUST_TEST_THREADS", "1");
    match secret {
        Some(secret) => child.env(DIGEST_SECRET_ENV, secret),
        None => child.env_remove(DIGEST_SECRET_ENV),
    };
    let out = child.output().expect("run the child");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let at = stdout
        .find(PRINTED)
        .unwrap_or_else(|| panic!("no digest printed: {stdout}"));
    stdout[at + PRINTED.len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect()
}

/// Only a child runs this for real: it prints its digest of the key.
#[test]
fn child_prints_its_digest() {
    if std::env::var_os(CHILD).is_some() {
        println!("{PRINTED}{}", digest_of_the_key());
    }
}

#[test]
fn processes_agree_on_a_digest_only_when_they_share_the_secret() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    // This process's secret, set in code before any digest; a second set is refused.
    KeyDigest::set_secret("fleet secret").expect("the first setting");
    assert_eq!(
        KeyDigest::set_secret("another"),
        Err(ConfigError::DigestSecretFixed)
    );
    let ours = digest_of_the_key();
    assert_eq!(ours.len(), 16, "64 bits in hex: {ours}");

    // The same secret through the environment: the same digest.
    assert_eq!(childs_digest(Some("fleet secret")), ours);
    // Another secret: another digest.
    assert_ne!(childs_digest(Some("other secret")), ours);
    // No secret: one drawn at random, so two such processes disagree.
    let (a, b) = (childs_digest(None), childs_digest(None));
    assert_ne!(a, ours);
    assert_ne!(a, b, "random secrets differ between processes");
}
