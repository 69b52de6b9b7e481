//! Resident memory per stored key at 1,000,000 keys, beyond the payload itself: what the
//! memory store costs for each completed record it keeps. Not a criterion benchmark (it
//! measures bytes, not time); it prints its figures.
//!
//! ```text
//! cargo bench -p idempotent-runtime --bench memory
//! ```

use idempotent_runtime::store::MemoryStore;
use idempotent_runtime::{Error, Idempotency};

const KEYS: u64 = 1_000_000;

/// Resident set size, from /proc (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    // The baseline runs in a process of its own: memory freed by the first measurement
    // would otherwise be reused by the second and hide its growth.
    if std::env::var_os("IDEM_MEMORY_BASELINE").is_some() {
        baseline();
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = MemoryStore::builder().capacity(KEYS + 1).build();
    let idem = Idempotency::new(store.clone());
    // Keys are `order-0000001` (13 bytes) in scope `m`; values are u64s, stored as JSON text.
    let mut payload = 0u64;
    let before = rss_bytes();
    rt.block_on(async {
        for i in 0..KEYS {
            let key = format!("order-{i:07}");
            payload += key.len() as u64 + i.to_string().len() as u64;
            let _: u64 = idem
                .call(key)
                .scope("m")
                .run(|| async move { Ok::<_, Error>(i) })
                .await
                .expect("store");
        }
    });
    store.run_pending_tasks();
    let after = rss_bytes();
    let kept = store.entry_count();
    let grown = after.saturating_sub(before);
    println!("keys stored:                 {kept}");
    println!(
        "resident growth:             {:.1} MiB",
        grown as f64 / 1048576.0
    );
    println!(
        "payload (key text + value):  {:.1} bytes/key",
        payload as f64 / KEYS as f64
    );
    println!(
        "resident per key:            {:.1} bytes/key",
        grown as f64 / kept.max(1) as f64
    );
    println!(
        "beyond the payload:          {:.1} bytes/key",
        (grown as f64 - payload as f64) / kept.max(1) as f64
    );

    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe)
        .env("IDEM_MEMORY_BASELINE", "1")
        .output()
        .expect("baseline process");
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

/// The same keys and bytes in a bare moka cache of strings to bytes, for comparison.
fn baseline() {
    let mut payload = 0u64;
    let raw: moka::sync::Cache<String, bytes::Bytes> = moka::sync::Cache::new(KEYS + 1);
    let before = rss_bytes();
    for i in 0..KEYS {
        let key = format!("m|order-{i:07}");
        payload += key.len() as u64 - 2 + i.to_string().len() as u64;
        raw.insert(key, bytes::Bytes::from(i.to_string()));
    }
    raw.run_pending_tasks();
    let grown = rss_bytes().saturating_sub(before);
    println!(
        "bare moka String->Bytes:     {:.1} bytes/key resident, {:.1} beyond the payload",
        grown as f64 / KEYS as f64,
        (grown as f64 - payload as f64) / KEYS as f64
    );
}
