//! The hasher of every in-process map keyed by idempotency keys (the flight map, the
//! memory store's claims and results, the Redis store's local tier).
//!
//! Keys come from callers, and callers may be hostile: the maps need a hasher keyed with a
//! random seed, so that nobody can choose keys that collide. Rust's default (SipHash 1-3)
//! is one, and it was about a tenth of a first execution's instructions: a call hashes its
//! key several times over. foldhash's `fast::RandomState` is seeded at random per process
//! (and per map) too, at a fraction of the cost; it resists collisions from keys chosen
//! without knowledge of that seed, which a caller has no way to read.

/// The [`BuildHasher`](std::hash::BuildHasher) of the in-process maps.
pub(crate) type KeyHasher = foldhash::fast::RandomState;
