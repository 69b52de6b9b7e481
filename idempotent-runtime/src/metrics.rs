//! The names of the counters and histograms the engine records through the
//! [`metrics`](https://docs.rs/metrics) crate's facade (feature `metrics`), so that any
//! exporter installed as the process's recorder (Prometheus, StatsD, OpenTelemetry) gets
//! them unchanged. Nothing is recorded until a recorder is installed.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | [`EXECUTIONS`] | counter | `scope`, `store` | operations run (whatever they returned) |
//! | [`REPLAYS`] | counter | `scope`, `store` | calls answered with a stored result |
//! | [`COALESCED`] | counter | `scope`, `store` | calls answered with the result of a duplicate in flight in this process |
//! | [`REJECTIONS`] | counter | `scope`, `store` | duplicates refused with `Error::InProgress` |
//! | [`MISMATCHES`] | counter | `scope`, `store` | calls refused with `Error::Mismatch` |
//! | [`STORE_ERRORS`] | counter | `scope`, `store`, `operation` | store operations that failed |
//! | [`LEASES_LOST`] | counter | `scope`, `store` | executions whose claim was taken over before their result was stored |
//! | [`UNSTORED`] | counter | `scope`, `store` | executions whose result was not stored although their claim held |
//! | [`EVICTIONS_BEFORE_TTL`] | counter | `store` | results a bounded store dropped before their TTL to make room |
//! | [`STORE_SECONDS`] | histogram | `store`, `operation` | one store round trip, failed ones and ones cut short included |
//! | [`WAIT_SECONDS`] | histogram | `scope`, `store`, `via` | one wait of a duplicate for the call in flight |
//!
//! The counters are those of [`Stats`](crate::Stats), per scope. Label values:
//! - `scope`: the attribute's scope (its `scope = "..."`, or the function's path), the
//!   one given to [`Call::metrics_scope`](crate::Call::metrics_scope), or [`CALL_SCOPE`]
//!   for calls of the engine's API without one; [`HTTP_SCOPE`] for the tower layer and
//!   the actix-web middleware, [`GRPC_SCOPE`] for the gRPC layer. Never a key, and never
//!   the scope given to [`Call::scope`](crate::Call::scope), which may come from a
//!   request: label values must be few, and only code chooses these.
//! - `store`: [`Store::kind`](crate::store::Store::kind): `memory`, `redis`, `postgres`,
//!   or `custom`.
//! - `operation`: `claim`, `renew`, `complete`, `release`;
//!   `inspect` and `forget` ([`Idempotency::record`](crate::Idempotency::record) and
//!   [`Idempotency::forget`](crate::Idempotency::forget), whose scope label is
//!   [`CALL_SCOPE`]); for [`Call::run_in_transaction`](crate::Call::run_in_transaction),
//!   `begin`, `verify` (the check, after an error, that the operation left its
//!   transaction open), `rollback`, `commit` (which also completes the claim) and
//!   `settle` (asking whether a commit whose answer was lost committed). Store errors
//!   also count `lookup`: a record the store keeps in this process answered in a state
//!   it should not have been (no round trip, so never timed).
//! - `via`: [`VIA_IN_PROCESS`] (coalesced behind a call of this process) or
//!   [`VIA_STORE`] (polling a key another process, or another engine, holds).
//!
//! Evictions carry no `scope`: the store that evicts sees only the key, whose scope may
//! have come from a request.
//!
//! ```
//! // At start-up, beside installing the exporter (`metrics-exporter-prometheus`'s
//! // `PrometheusBuilder::new().install()?`, say):
//! idempotent_runtime::metrics::describe();
//! ```

/// Counter: operations run, whatever they returned ([`Stats::executed`](crate::Stats::executed)).
pub const EXECUTIONS: &str = "idempotent_executions_total";
/// Counter: calls answered with a stored result ([`Stats::replayed`](crate::Stats::replayed)).
pub const REPLAYS: &str = "idempotent_replays_total";
/// Counter: calls answered with the result of a duplicate in flight in this process
/// ([`Stats::coalesced`](crate::Stats::coalesced)).
pub const COALESCED: &str = "idempotent_coalesced_total";
/// Counter: duplicates refused with [`Error::InProgress`](crate::Error::InProgress)
/// ([`Stats::rejected`](crate::Stats::rejected)).
pub const REJECTIONS: &str = "idempotent_rejections_total";
/// Counter: calls refused with [`Error::Mismatch`](crate::Error::Mismatch)
/// ([`Stats::mismatched`](crate::Stats::mismatched)).
pub const MISMATCHES: &str = "idempotent_mismatches_total";
/// Counter: store operations that failed, by `operation`
/// ([`Stats::store_errors`](crate::Stats::store_errors)).
pub const STORE_ERRORS: &str = "idempotent_store_errors_total";
/// Counter: executions whose claim was taken over before their result was stored
/// ([`Stats::lease_lost`](crate::Stats::lease_lost)).
pub const LEASES_LOST: &str = "idempotent_leases_lost_total";
/// Counter: executions whose result was not stored although their claim held
/// ([`Stats::unstored`](crate::Stats::unstored)).
pub const UNSTORED: &str = "idempotent_unstored_total";
/// Counter: results a bounded store dropped before their TTL to make room, each of which
/// can let a retry run again ([`Stats::evicted`](crate::Stats::evicted)). Labelled by
/// `store` only.
pub const EVICTIONS_BEFORE_TTL: &str = "idempotent_evictions_before_ttl_total";
/// Histogram, in seconds: one store round trip, by `operation` and `store`. Failed ones
/// are included, and so are ones cut short (by the engine's time limit, a cancelled
/// caller, or a renewal in flight when the operation returned), with the time they ran:
/// left out, the slowest would be the ones missing.
pub const STORE_SECONDS: &str = "idempotent_store_seconds";
/// Histogram, in seconds: one wait of a duplicate for the call in flight with its key,
/// by `via`, until it was answered, took over, or gave up.
pub const WAIT_SECONDS: &str = "idempotent_wait_seconds";

/// The label naming the call's scope.
pub const SCOPE_LABEL: &str = "scope";
/// The label naming the store's kind, [`Store::kind`](crate::store::Store::kind).
pub const STORE_LABEL: &str = "store";
/// The label naming a store operation: see the [module's](self) list.
pub const OPERATION_LABEL: &str = "operation";
/// The label saying what a duplicate waited on: [`VIA_IN_PROCESS`] or [`VIA_STORE`].
pub const VIA_LABEL: &str = "via";

/// `scope` of calls made through the engine's API without
/// [`Call::metrics_scope`](crate::Call::metrics_scope).
pub const CALL_SCOPE: &str = crate::observe::CALL_LABEL;
/// `scope` of calls made by the tower layer and the actix-web middleware, whose scopes
/// are made from request paths.
pub const HTTP_SCOPE: &str = crate::observe::HTTP_LABEL;
/// `scope` of calls made by the gRPC layer.
pub const GRPC_SCOPE: &str = crate::observe::GRPC_LABEL;

/// `via` of a duplicate that waited behind a call in this process.
pub const VIA_IN_PROCESS: &str = "in_process";
/// `via` of a call that polled the store while another process (or another engine)
/// held its key.
pub const VIA_STORE: &str = "store";

/// Registers the description and unit of every metric with the installed recorder, for
/// exporters that show them (Prometheus's `# HELP`). Call it once, after installing the
/// recorder; metrics are recorded with or without it.
pub fn describe() {
    use ::metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        EXECUTIONS,
        Unit::Count,
        "Idempotent operations run, whatever they returned"
    );
    describe_counter!(
        REPLAYS,
        Unit::Count,
        "Idempotent calls answered with a stored result"
    );
    describe_counter!(
        COALESCED,
        Unit::Count,
        "Idempotent calls answered with the result of a duplicate in flight in this process"
    );
    describe_counter!(
        REJECTIONS,
        Unit::Count,
        "Duplicates refused because their key was in flight"
    );
    describe_counter!(
        MISMATCHES,
        Unit::Count,
        "Idempotent calls refused because their key was used with another fingerprint"
    );
    describe_counter!(
        STORE_ERRORS,
        Unit::Count,
        "Idempotency store operations that failed"
    );
    describe_counter!(
        LEASES_LOST,
        Unit::Count,
        "Executions whose claim was taken over before their result was stored"
    );
    describe_counter!(
        UNSTORED,
        Unit::Count,
        "Executions whose result was not stored although their claim held"
    );
    describe_counter!(
        EVICTIONS_BEFORE_TTL,
        Unit::Count,
        "Idempotency results dropped before their TTL to make room"
    );
    describe_histogram!(
        STORE_SECONDS,
        Unit::Seconds,
        "Idempotency store round trips, by operation"
    );
    describe_histogram!(
        WAIT_SECONDS,
        Unit::Seconds,
        "Time a duplicate waited for the call in flight with its key"
    );
}
