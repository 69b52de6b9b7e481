//! An outside review of the framework-free HTTP core: `read_key` against the earlier
//! release's `HeaderValue::to_str` parser, `fingerprint_request` against the earlier
//! release's fingerprints, `StoredResponse`'s stored format, and the module docs' "layer of
//! your own" against the tower layer on one engine.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use http::HeaderValue;
use idempotent_runtime::http::{
    fingerprint_request, read_key, request_scope, IdempotencyLayer, KeyProblem, Problem,
    StoredResponse,
};
use idempotent_runtime::{Error, Fingerprint, Idempotency, Outcome};
use serde::Serialize;
use serde_json::Value;
use sha2_free::hex_sha256;

/// The earlier release's reading of one header value: `HeaderValue::to_str`, then `trim`,
/// then the same grammar (the grammar did not change; only the text check before it).
fn old_read(v: &[u8]) -> Option<Result<Option<String>, KeyProblem>> {
    let value = HeaderValue::from_bytes(v).ok()?; // what an `http` header can hold
    Some(match value.to_str() {
        Err(_) => Err(KeyProblem::Malformed),
        Ok(text) => read_key([text.trim().as_bytes()], 255),
    })
}

#[test]
fn read_key_agrees_with_the_earlier_parser_on_every_byte() {
    let mut compared = 0;
    for b in 0u8..=255 {
        for shape in [
            vec![b'k', b, b'k'],
            vec![b, b'k'],
            vec![b'k', b],
            vec![b'"', b'k', b, b'"'],
            vec![b'"', b'k', b'"', b],
            vec![b'k', b';', b'x', b'=', b],
            vec![b],
        ] {
            let new = read_key([&shape[..]], 255);
            match old_read(&shape) {
                Some(old) => {
                    compared += 1;
                    assert_eq!(new, old, "{shape:?}");
                }
                // Bytes an `http` header cannot hold (CR, LF, NUL, ...), which another
                // framework might pass: never a key.
                None => assert!(
                    matches!(new, Err(KeyProblem::Malformed) | Err(KeyProblem::Empty)),
                    "{shape:?} -> {new:?}"
                ),
            }
        }
    }
    assert!(compared > 1000);
}

#[test]
fn read_key_on_raw_values_a_framework_may_pass() {
    // Values with CR/LF or NUL inside, as a lax framework might hand over.
    for v in [&b"k\r\nx"[..], b"k\0", b"\"k\0\"", b"k\x0b", b"\x0ck"] {
        assert_eq!(read_key([v], 255), Err(KeyProblem::Malformed), "{v:?}");
    }
    // Obs-text (Latin-1 and UTF-8) is malformed, not a key.
    for v in [&b"caf\xe9"[..], "café".as_bytes(), b"\"caf\xe9\""] {
        assert_eq!(read_key([v], 255), Err(KeyProblem::Malformed), "{v:?}");
    }
    // Trimming is of spaces and tabs only.
    assert_eq!(read_key([&b"\t k \t"[..]], 255), Ok(Some("k".into())));
    // The length limit is in bytes of the key, at the edge.
    let k = "k".repeat(255);
    assert_eq!(read_key([k.as_bytes()], 255), Ok(Some(k.clone())));
    assert_eq!(
        read_key([format!("\"{k}k\"").as_bytes()], 255),
        Err(KeyProblem::TooLong { len: 256, max: 255 })
    );
}

/// The shape earlier releases fingerprinted, through a `serde_json::Value`.
#[derive(Serialize)]
struct OldShape<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    body: OldBody,
}

#[derive(Serialize)]
enum OldBody {
    Json(Value),
    Sha256(String),
}

/// A request's method, path, query, content type and body.
type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

#[test]
fn fingerprints_match_the_earlier_releases_on_awkward_requests() {
    let json = Some("application/json");
    let cases: &[Case] = &[
        ("POST", "/payments", Some(""), json, br#"{"a":1}"#),
        (
            "PATCH",
            "/p%20q/%2F",
            Some("x=%20&y&=&z=\u{e9}"),
            json,
            br#"{"b":[1,2.5,-0.5,"x"]}"#,
        ),
        (
            "POST",
            "/",
            None,
            Some("application/vnd.x+json; charset=utf-8"),
            br#"{"s":"\u00e9\n\"","n":null}"#,
        ),
        ("POST", "/p", None, json, b""),
        ("POST", "/p", None, json, b"not json"),
        ("POST", "/p", None, None, br#"{"a":1}"#),
        ("POST", "/p", None, Some("text/plain"), b"\xff\x00"),
        ("PURGE", "/p\"q\\", Some("\""), json, b"[]"),
    ];
    for (method, path, query, ct, body) in cases {
        let new = fingerprint_request(method, path, *query, *ct, body).unwrap();
        let parsed: Option<Value> = ct
            .filter(|c| c.contains("json"))
            .and_then(|_| serde_json::from_slice(body).ok());
        let old_body = match parsed {
            Some(v) => OldBody::Json(v),
            None => OldBody::Sha256(hex_sha256(body)),
        };
        let old = Fingerprint::of(&OldShape {
            method,
            path,
            query: *query,
            body: old_body,
        })
        .unwrap();
        assert_eq!(new, old, "{method} {path} {query:?} {ct:?} {body:?}");
    }
}

#[test]
fn the_stored_format_is_the_earlier_releases() {
    // What e53d622's `StoredResponse` serialized to (the same fields and `Octets` tags).
    let old = r#"{"status":201,"headers":[["set-cookie",{"Text":"a=1"}],["location",{"Text":"/p/1"}],["set-cookie",{"Text":"b=2"}],["x-latin1",{"Bytes":[99,97,102,233]}]],"body":{"Bytes":[255,0,1]}}"#;
    let back: StoredResponse = serde_json::from_str(old).expect("an old record still reads");
    assert_eq!(back.status(), 201);
    let headers: Vec<_> = back.headers().collect();
    assert_eq!(
        headers,
        [
            ("set-cookie", &b"a=1"[..]),
            ("location", b"/p/1"),
            ("set-cookie", b"b=2"),
            ("x-latin1", b"caf\xe9"),
        ]
    );
    assert_eq!(back.body(), &[255, 0, 1]);
    let new = StoredResponse::new(
        201,
        [
            ("Set-Cookie", &b"a=1"[..]),
            ("LOCATION", b"/p/1"),
            ("set-cookie", b"b=2"),
            ("X-Latin1", b"caf\xe9"),
            ("Connection", b"X-Trace, close"),
            ("x-trace", b"1"),
            ("Transfer-Encoding", b"chunked"),
            ("KEEP-ALIVE", b"timeout=5"),
        ],
        &[255, 0, 1],
    );
    assert_eq!(serde_json::to_string(&new).unwrap(), old);
}

#[test]
fn problems_are_rfc_9457_bodies() {
    for (p, status) in [
        (Problem::from_engine(&Error::InProgress, 2), 409),
        (Problem::from_engine(&Error::Mismatch, 2), 422),
        (Problem::for_key(&KeyProblem::Repeated), 400),
        (Problem::body_too_large(10), 413),
        (Problem::broken_response(), 502),
        (Problem::unreadable_body(), 400),
    ] {
        let body: Value = serde_json::from_slice(&p.body()).unwrap();
        assert_eq!(p.status(), status);
        assert_eq!(body["status"], status);
        for f in ["type", "title", "detail"] {
            assert!(body[f].as_str().is_some_and(|s| !s.is_empty()), "{body}");
        }
        assert_eq!(p.retry_after().is_some(), status == 409);
    }
}

// ---------------------------------------------------------------------------------------
// The module docs' layer of your own, against the tower layer on one engine
// ---------------------------------------------------------------------------------------

/// The fingerprint exactly as the module docs' "layer of your own" computes it (after the
/// review: the query passed, the first content type if visible ASCII; the first version
/// left the query out and took the first UTF-8 value, and disagreed with the tower layer).
fn docs_layer_fingerprint(
    path: &str,
    query: Option<&str>,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Fingerprint {
    let content_type = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| *v)
        .next()
        .filter(|v| v.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .and_then(|v| std::str::from_utf8(v).ok());
    fingerprint_request("POST", path, query, content_type, body).unwrap()
}

/// The tower layer stores a request; the docs' layer sends the same request with the same
/// key through `Call::with_fingerprint` on the same engine: it must be a replay.
async fn docs_layer_after_tower(
    uri: &str,
    ct: &[u8],
    body: &'static [u8],
) -> Result<Outcome, Error> {
    use tower::ServiceExt;
    let idem = Idempotency::memory();
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let router = axum::Router::new()
        .fallback(move || {
            r.fetch_add(1, Ordering::SeqCst);
            async { (axum::http::StatusCode::CREATED, "tower") }
        })
        .layer(IdempotencyLayer::new(idem.clone()));
    let req = axum::http::Request::post(uri)
        .header("content-type", HeaderValue::from_bytes(ct).unwrap())
        .header("idempotency-key", "k")
        .body(axum::body::Body::from(body))
        .unwrap();
    assert_eq!(router.oneshot(req).await.unwrap().status(), 201);
    // The docs' `Req` has a `path` and a `query`, as frameworks split them.
    let (path, query) = match uri.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (uri, None),
    };
    let fp = docs_layer_fingerprint(path, query, &[("Content-Type", ct)], body);
    let answer = idem
        .call("k".to_owned())
        .scope(request_scope(None))
        .with_fingerprint(fp)
        .run_with_outcome(|| async { Ok::<_, Error>(StoredResponse::new(201, [], b"docs layer")) })
        .await;
    answer.map(|(_, outcome)| outcome)
}

#[tokio::test]
async fn the_docs_layer_of_your_own_shares_records_with_the_tower_layer() {
    // A plain request: the same record.
    assert_eq!(
        docs_layer_after_tower("/payments", b"application/json", br#"{"a": 1}"#)
            .await
            .map_err(|e| e.to_string()),
        Ok(Outcome::Replayed)
    );
}

#[tokio::test]
async fn the_docs_layer_of_your_own_with_a_query_string() {
    // The tower layer (by default) fingerprints the query; so does the docs' layer.
    let got = docs_layer_after_tower("/payments?order=7", b"application/json", br#"{"a":1}"#)
        .await
        .map_err(|e| e.to_string());
    assert_eq!(
        got,
        Ok(Outcome::Replayed),
        "the docs' layer vs the tower layer, with a query"
    );
}

#[tokio::test]
async fn the_docs_layer_of_your_own_with_a_utf8_content_type() {
    // A content type that is UTF-8 but not visible ASCII: the tower layer (and the actix
    // middleware) read it as absent (`to_str` fails) and compare the body by bytes; so
    // does the docs' layer.
    let got = docs_layer_after_tower(
        "/payments",
        "application/json; profile=\"é\"".as_bytes(),
        br#"{ "a": 1 }"#,
    )
    .await
    .map_err(|e| e.to_string());
    assert_eq!(
        got,
        Ok(Outcome::Replayed),
        "the docs' layer vs the tower layer, UTF-8 content type"
    );
}

mod sha2_free {
    /// SHA-256 as lowercase hex, without a sha2 dependency here: through the fingerprint
    /// of a known shape is circular, so use the system's `sha256sum`-free path: the
    /// `Fingerprint` of raw bytes is not the digest either. Computed by a tiny SHA-256.
    pub fn hex_sha256(data: &[u8]) -> String {
        sha256(data).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sha256(data: &[u8]) -> [u8; 32] {
        const K: [u32; 64] = [
            0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
            0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
            0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
            0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
            0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
            0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
            0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
            0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
            0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
            0xc67178f2,
        ];
        let mut h: [u32; 8] = [
            0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
            0x5be0cd19,
        ];
        let mut msg = data.to_vec();
        let bits = (data.len() as u64) * 8;
        msg.push(0x80);
        while msg.len() % 64 != 56 {
            msg.push(0);
        }
        msg.extend_from_slice(&bits.to_be_bytes());
        for chunk in msg.chunks(64) {
            let mut w = [0u32; 64];
            for i in 0..16 {
                w[i] = u32::from_be_bytes([
                    chunk[4 * i],
                    chunk[4 * i + 1],
                    chunk[4 * i + 2],
                    chunk[4 * i + 3],
                ]);
            }
            for i in 16..64 {
                let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
                let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
                w[i] = w[i - 16]
                    .wrapping_add(s0)
                    .wrapping_add(w[i - 7])
                    .wrapping_add(s1);
            }
            let mut v = h;
            for i in 0..64 {
                let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
                let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
                let t1 = v[7]
                    .wrapping_add(s1)
                    .wrapping_add(ch)
                    .wrapping_add(K[i])
                    .wrapping_add(w[i]);
                let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
                let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
                let t2 = s0.wrapping_add(maj);
                v = [
                    t1.wrapping_add(t2),
                    v[0],
                    v[1],
                    v[2],
                    v[3].wrapping_add(t1),
                    v[4],
                    v[5],
                    v[6],
                ];
            }
            for i in 0..8 {
                h[i] = h[i].wrapping_add(v[i]);
            }
        }
        let mut out = [0u8; 32];
        for i in 0..8 {
            out[4 * i..4 * i + 4].copy_from_slice(&h[i].to_be_bytes());
        }
        out
    }

    #[test]
    fn known_digest() {
        assert_eq!(
            hex_sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
