//! A call's request as gRPC frames it (a compression flag, a 4-byte big-endian length,
//! the message), and its fingerprint.

use sha2::{Digest, Sha256};

use crate::fingerprint::Fingerprint;

/// The messages of a request body, each with its compression flag; `None` when the body
/// is not a sequence of whole frames.
pub(crate) fn messages(mut body: &[u8]) -> Option<Vec<(bool, &[u8])>> {
    let mut out = Vec::with_capacity(1);
    while !body.is_empty() {
        let (&flag, rest) = body.split_first()?;
        if flag > 1 {
            return None;
        }
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (message, rest) = rest.split_at(len);
        out.push((flag == 1, message));
        body = rest;
    }
    Some(out)
}

/// The fingerprint of a call: its method's path and its messages, as sent. A compressed
/// message is compared by its compressed bytes, so a retry must compress as the first
/// call did (the same client library does).
///
/// The hashed text is unambiguous: each part is preceded by its length, and the messages
/// by their compression flags; the leading tag keeps it apart from every other kind of
/// fingerprint.
pub(crate) fn fingerprint(path: &str, messages: &[(bool, &[u8])]) -> Fingerprint {
    let mut hasher = Sha256::new();
    hasher.update(b"idempotent/grpc/1\0");
    hasher.update((path.len() as u64).to_be_bytes());
    hasher.update(path.as_bytes());
    hasher.update((messages.len() as u64).to_be_bytes());
    for (compressed, message) in messages {
        hasher.update([u8::from(*compressed)]);
        hasher.update((message.len() as u64).to_be_bytes());
        hasher.update(message);
    }
    Fingerprint::from_bytes(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(compressed: bool, message: &[u8]) -> Vec<u8> {
        let mut f = vec![u8::from(compressed)];
        f.extend_from_slice(&(message.len() as u32).to_be_bytes());
        f.extend_from_slice(message);
        f
    }

    #[test]
    fn whole_frames_are_read_and_broken_ones_refused() {
        let mut body = frame(false, b"abc");
        body.extend(frame(true, b""));
        assert_eq!(
            messages(&body),
            Some(vec![(false, &b"abc"[..]), (true, &b""[..])])
        );
        assert_eq!(messages(b""), Some(vec![]));
        assert_eq!(messages(&body[..body.len() - 1]), None, "a cut header");
        assert_eq!(messages(&frame(false, b"abc")[..7]), None, "a cut message");
        assert_eq!(messages(&frame(false, b"abc")[..3]), None, "a cut length");
        let mut bad_flag = frame(false, b"abc");
        bad_flag[0] = 2;
        assert_eq!(messages(&bad_flag), None);
    }

    #[test]
    fn path_messages_and_their_flags_all_count() {
        let fp = |path: &str, m: &[(bool, &[u8])]| fingerprint(path, m);
        let base = fp("/p.S/M", &[(false, b"ab")]);
        assert_eq!(base, fp("/p.S/M", &[(false, b"ab")]));
        assert_ne!(base, fp("/p.S/N", &[(false, b"ab")]));
        assert_ne!(base, fp("/p.S/M", &[(false, b"ac")]));
        assert_ne!(base, fp("/p.S/M", &[(true, b"ab")]));
        // The same bytes split differently are different requests.
        assert_ne!(base, fp("/p.S/M", &[(false, b"a"), (false, b"b")]));
        assert_ne!(
            fp("/p.S/Ma", &[(false, b"b")]),
            fp("/p.S/M", &[(false, b"ab")])
        );
    }
}
