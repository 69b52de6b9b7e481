//! The switch that turns the `#[idempotent]` attribute off for a whole process, as AWS
//! Lambda Powertools' `POWERTOOLS_IDEMPOTENCY_DISABLED` does: for a local run or a test
//! of business logic where replays would only get in the way.

use std::sync::OnceLock;

/// The environment variable that turns the attribute off: `1`, `true`, `yes` or `on`.
pub const DISABLED_ENV: &str = "IDEMPOTENT_DISABLED";

/// Whether the attribute is switched off in this process, read once, at the first call
/// of an attributed function. When it is, that first call logs a warning, and every
/// attributed function runs its body directly: no key, no replay, no single-flight.
/// Functions with `transaction = tx` still run through the engine, whose transaction
/// their body needs; the engine's own API and the layers are not affected.
pub(crate) fn disabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| {
        let off = std::env::var(DISABLED_ENV).is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        if off {
            tracing::warn!(
                "{DISABLED_ENV} is set: #[idempotent] functions run their bodies directly, \
                 with no idempotency key, replay or single-flight; never set it in production"
            );
        }
        off
    })
}
