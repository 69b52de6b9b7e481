//! The store conformance suite against the in-memory store.

idempotent_tests::store_conformance!(idempotent_tests::MemoryHarness::new());
