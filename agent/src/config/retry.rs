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
