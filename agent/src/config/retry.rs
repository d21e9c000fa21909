//! `retry:` validated: attempts and back-off.

use super::*;

impl Validator {
    pub(super) fn retry(&mut self, raw: RawRetry) -> RetryConfig {
        let attempts = raw.attempts.unwrap_or(defaults::RETRY_ATTEMPTS);
        if attempts == 0 {
            self.error("retry.attempts", "must be at least 1 (1 means no retries)");
        }
        let initial_delay = self.duration(
            "retry.initial_delay",
            raw.initial_delay,
            defaults::RETRY_INITIAL_DELAY,
        );
        let max_delay = self.duration("retry.max_delay", raw.max_delay, defaults::RETRY_MAX_DELAY);
        if max_delay < initial_delay {
            self.error(
                "retry.max_delay",
                "must not be less than retry.initial_delay",
            );
        }
        RetryConfig {
            attempts: attempts.max(1),
            initial_delay,
            max_delay,
        }
    }
}

impl RetryConfig {
    /// The delay after failed attempt `attempt` (1-based): the initial delay
    /// doubled per attempt, capped, then scaled into `[d/2, d]` by `unit` in
    /// `[0, 1)` so agents that failed together do not retry together.
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let full = self
            .initial_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        full.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}
