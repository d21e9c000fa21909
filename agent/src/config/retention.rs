//! `retention:` validated into a [`RetentionPolicy`](crate::policy::retention::RetentionPolicy).

use super::*;

impl Validator {
    pub(super) fn retention(
        &mut self,
        raw: RawRetention,
    ) -> crate::policy::retention::RetentionPolicy {
        use crate::policy::retention::{parse_duration, RetentionPolicy};
        let mut duration = |field: &'static str, text: Option<String>| match text {
            None => None,
            Some(t) => match parse_duration(field, t.trim()) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.error(format!("retention.{}", e.field()), e.to_string());
                    None
                }
            },
        };
        let max_age = duration("max_age", raw.max_age);
        let stale = duration("stale_partial_after", raw.stale_partial_after);
        let policy = RetentionPolicy {
            keep_last: raw.keep_last,
            keep_hourly: raw.keep_hourly,
            keep_daily: raw.keep_daily,
            keep_weekly: raw.keep_weekly,
            keep_monthly: raw.keep_monthly,
            max_age,
            stale_partial_after: stale
                .unwrap_or(crate::policy::retention::DEFAULT_STALE_PARTIAL_AFTER),
        };
        match policy.clone().validated() {
            Ok(p) => p,
            Err(e) => {
                self.error(format!("retention.{}", e.field()), e.to_string());
                RetentionPolicy::default()
            }
        }
    }
}
