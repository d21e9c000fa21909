//! Which backup sets to keep: the `retention:` policy, decided without I/O.
//!
//! The catalog lists what a node has; this module says what should go and why;
//! the caller deletes (manifest first, so a half-deleted set is never complete).
//! Keeping the decision pure lets `prune --dry-run` print exactly what a real
//! prune would do, and lets the tests run a year of sets in milliseconds.
//!
//! # Semantics
//!
//! **Retention is disabled** when no `keep_*` rule is set (absent or `0`) and
//! `max_age` is absent: every complete set is kept. Leftovers of crashed runs
//! are a separate matter, see [`stale_leftovers`].
//!
//! **The `keep_*` rules** work as restic's `forget --keep-*` (restic 0.16 and
//! later). The sets are walked newest first; each rule with a count `N > 0`
//! keeps a set when the set's bucket differs from the bucket of the last set that
//! rule kept, until the rule has kept `N` sets. So every rule keeps the *newest*
//! set of each of the `N` newest buckets that have sets; empty buckets (hours
//! without a backup) are skipped, not counted. Buckets, all in **UTC** (a set's
//! name is its UTC start time, so this is the time a reader sees):
//!
//! | rule           | bucket                                             |
//! |----------------|----------------------------------------------------|
//! | `keep_last`    | every set is its own bucket                        |
//! | `keep_hourly`  | the UTC hour                                       |
//! | `keep_daily`   | the UTC calendar day                               |
//! | `keep_weekly`  | the ISO 8601 week (Monday to Sunday) with its ISO year, as restic's year-week; 2025-12-31 is in week 2026-W01 |
//! | `keep_monthly` | the UTC calendar month                             |
//!
//! As in restic, when a rule has walked every set and still kept fewer than `N`,
//! it also keeps the **oldest** set (even when that set shares its bucket with a
//! set already kept), so a young history is not thinned before the rule is full.
//! A set kept by **any** rule stays.
//!
//! **`max_age` is an upper bound**, for compliance: a set older than `max_age`
//! (`now - timestamp > max_age`) is removed even when a `keep_*` rule would keep
//! it; `max_age` never keeps a set by itself while any `keep_*` rule is set. With
//! `max_age` and no `keep_*` rule, every set not older than `max_age` is kept.
//! The `keep_*` rules are evaluated over all sets first (so a removed set's
//! reasons still show which rule would have kept it), then `max_age` cuts.
//! `keep_monthly: 12` with `max_age: 90d` therefore keeps about three monthly sets.
//!
//! **The newest complete set is never removed**, whatever the rules say,
//! `max_age` included: an agent whose backups have been failing for longer than
//! `max_age` still has one set to restore from.
//!
//! Ages are measured against the `now` the caller passes. A set timestamp in the
//! future (a clock stepped back) has no age and is never older than anything.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use etcd_backup_proto::SetTimestamp;

/// `stale_partial_after` when the config does not set it.
pub const DEFAULT_STALE_PARTIAL_AFTER: Duration = Duration::from_secs(60 * 60);

/// The smallest `stale_partial_after` accepted. A `prune` started from the
/// command line does not know about a run the daemon has in progress; only the
/// age protects that run's files.
pub const MIN_STALE_PARTIAL_AFTER: Duration = Duration::from_secs(60);

/// The `retention:` section of the config.
///
/// Build it with a struct literal and check it with [`RetentionPolicy::validated`];
/// [`Default`] is retention disabled with `stale_partial_after` of one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep the `N` newest sets. `None` or `0`: the rule is off.
    pub keep_last: Option<u32>,
    /// Keep the newest set of each of the `N` newest UTC hours that have sets.
    pub keep_hourly: Option<u32>,
    /// Keep the newest set of each of the `N` newest UTC days that have sets.
    pub keep_daily: Option<u32>,
    /// Keep the newest set of each of the `N` newest ISO weeks that have sets.
    pub keep_weekly: Option<u32>,
    /// Keep the newest set of each of the `N` newest UTC months that have sets.
    pub keep_monthly: Option<u32>,
    /// Remove sets older than this even when a `keep_*` rule keeps them (the
    /// newest set excepted).
    pub max_age: Option<Duration>,
    /// Leftovers of crashed runs older than this are removed.
    pub stale_partial_after: Duration,
}

impl Default for RetentionPolicy {
    /// Retention disabled; stale leftovers removed after one hour. (Not derived:
    /// a zero `stale_partial_after` would remove files of a run still writing.)
    fn default() -> Self {
        Self {
            keep_last: None,
            keep_hourly: None,
            keep_daily: None,
            keep_weekly: None,
            keep_monthly: None,
            max_age: None,
            stale_partial_after: DEFAULT_STALE_PARTIAL_AFTER,
        }
    }
}

/// A `retention:` value that cannot be used. [`RetentionError::field`] names the
/// key, for the config layer's `retention.<field>` error path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    /// `max_age` is zero, which would remove every set but the newest.
    #[error("max_age is zero, which would remove every backup set but the newest; give a positive duration such as \"90d\", or leave max_age out to keep sets of any age")]
    ZeroMaxAge,
    /// `stale_partial_after` is below [`MIN_STALE_PARTIAL_AFTER`].
    #[error("stale_partial_after is {}, below the minimum of 1m: a shorter value could remove the files of a backup that is still being written; give a duration such as \"1h\" (the default)", format_duration(*given))]
    StalePartialTooShort {
        /// The value given.
        given: Duration,
    },
    /// A duration that does not parse.
    #[error("{field}: invalid duration {text:?}: {reason}; use a number with a unit, such as \"90d\", \"2w\", \"12h\" or \"30m\"")]
    BadDuration {
        /// The key it was given for.
        field: &'static str,
        /// The text given.
        text: String,
        /// What the parser said.
        reason: String,
    },
}

impl RetentionError {
    /// The key (below `retention:`) the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::ZeroMaxAge => "max_age",
            Self::StalePartialTooShort { .. } => "stale_partial_after",
            Self::BadDuration { field, .. } => field,
        }
    }
}

/// Parses a `retention:` duration such as `90d`, `2w`, `36h` or `1h 30m`
/// (humantime units: `s`, `m`, `h`, `d`, `w`; `M` is 30.44 days and `y` 365.25
/// days, so prefer days and weeks where exactness matters).
///
/// # Errors
/// [`RetentionError::BadDuration`] naming `field` when `text` does not parse.
pub fn parse_duration(field: &'static str, text: &str) -> Result<Duration, RetentionError> {
    humantime::parse_duration(text.trim()).map_err(|e| RetentionError::BadDuration {
        field,
        text: text.to_string(),
        reason: e.to_string(),
    })
}

impl RetentionPolicy {
    /// The validating constructor: returns the policy when every value is usable.
    /// `keep_*` of `0` is accepted and means the rule is off, as in restic.
    ///
    /// # Errors
    /// [`RetentionError::ZeroMaxAge`] for a zero `max_age`;
    /// [`RetentionError::StalePartialTooShort`] for a `stale_partial_after` below
    /// one minute.
    pub fn validated(self) -> Result<Self, RetentionError> {
        if self.max_age.is_some_and(|d| d.is_zero()) {
            return Err(RetentionError::ZeroMaxAge);
        }
        if self.stale_partial_after < MIN_STALE_PARTIAL_AFTER {
            return Err(RetentionError::StalePartialTooShort {
                given: self.stale_partial_after,
            });
        }
        Ok(self)
    }

    /// Whether complete sets can be removed at all: some `keep_*` rule is set
    /// above zero, or `max_age` is set. Leftover clean-up does not depend on it.
    pub fn is_enabled(&self) -> bool {
        !self.rules().is_empty() || self.max_age.is_some()
    }

    /// The `keep_*` rules that are on, in a fixed order.
    fn rules(&self) -> Vec<(Rule, u32)> {
        [
            (Rule::Last, self.keep_last),
            (Rule::Hourly, self.keep_hourly),
            (Rule::Daily, self.keep_daily),
            (Rule::Weekly, self.keep_weekly),
            (Rule::Monthly, self.keep_monthly),
        ]
        .into_iter()
        .filter_map(|(rule, n)| n.filter(|&n| n > 0).map(|n| (rule, n)))
        .collect()
    }
}

/// One complete set as the catalog sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetInfo {
    /// When its run started; also its name.
    pub timestamp: SetTimestamp,
}

impl From<SetTimestamp> for SetInfo {
    fn from(timestamp: SetTimestamp) -> Self {
        Self { timestamp }
    }
}

/// One `keep_*` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// `keep_last`.
    Last,
    /// `keep_hourly`.
    Hourly,
    /// `keep_daily`.
    Daily,
    /// `keep_weekly`.
    Weekly,
    /// `keep_monthly`.
    Monthly,
}

impl Rule {
    /// The config key.
    pub fn key(self) -> &'static str {
        match self {
            Self::Last => "keep_last",
            Self::Hourly => "keep_hourly",
            Self::Daily => "keep_daily",
            Self::Weekly => "keep_weekly",
            Self::Monthly => "keep_monthly",
        }
    }

    /// The bucket of the set at `index` (newest first). Buckets only need to be
    /// equal within one bucket and ordered like time, so plain integers do.
    fn bucket(self, at: DateTime<Utc>, index: usize) -> i64 {
        match self {
            Self::Last => -(index as i64),
            Self::Hourly => at.timestamp().div_euclid(3600),
            Self::Daily => at.timestamp().div_euclid(86_400),
            Self::Weekly => {
                let week = at.iso_week();
                i64::from(week.year()) * 100 + i64::from(week.week())
            }
            Self::Monthly => i64::from(at.year()) * 12 + i64::from(at.month0()),
        }
    }

    fn reason(self, n: u32, of: u32) -> Reason {
        match self {
            Self::Last => Reason::KeepLast { n, of },
            Self::Hourly => Reason::KeepHourly { n, of },
            Self::Daily => Reason::KeepDaily { n, of },
            Self::Weekly => Reason::KeepWeekly { n, of },
            Self::Monthly => Reason::KeepMonthly { n, of },
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// Why a set is kept or removed, for `prune --dry-run` and the logs.
///
/// `n` is the set's place among those its rule kept (1 is the newest), `of` the
/// rule's count from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The newest complete set, which is never removed.
    Newest,
    /// Kept by `keep_last`.
    KeepLast {
        /// Place among the sets this rule kept.
        n: u32,
        /// The rule's count.
        of: u32,
    },
    /// Kept by `keep_hourly`: the newest set of its hour.
    KeepHourly {
        /// Place among the hours this rule kept.
        n: u32,
        /// The rule's count.
        of: u32,
    },
    /// Kept by `keep_daily`: the newest set of its day.
    KeepDaily {
        /// Place among the days this rule kept.
        n: u32,
        /// The rule's count.
        of: u32,
    },
    /// Kept by `keep_weekly`: the newest set of its ISO week.
    KeepWeekly {
        /// Place among the weeks this rule kept.
        n: u32,
        /// The rule's count.
        of: u32,
    },
    /// Kept by `keep_monthly`: the newest set of its month.
    KeepMonthly {
        /// Place among the months this rule kept.
        n: u32,
        /// The rule's count.
        of: u32,
    },
    /// The oldest set, kept because `rule` found fewer buckets than its count
    /// (restic does the same, to keep the longest history the rules allow).
    Oldest {
        /// The rule that is not full.
        rule: Rule,
        /// Buckets the rule had kept before this set.
        kept: u32,
        /// The rule's count.
        of: u32,
    },
    /// Only `max_age` is set, and the set is not older than it.
    WithinMaxAge {
        /// The configured `max_age`.
        max_age: Duration,
    },
    /// No `keep_*` rule and no `max_age`: nothing is removed.
    RetentionDisabled,
    /// Older than `max_age`: removed, unless it is the newest set.
    MaxAge {
        /// The configured `max_age`.
        max_age: Duration,
        /// How old the set is.
        age: Duration,
    },
    /// No rule keeps it.
    NotKept,
    /// A set this agent does not fully understand (a newer manifest
    /// `format_version`, or files it did not write): it counts as a set, so
    /// the rules see the real history, but it is never removed.
    NotUnderstood,
}

impl Reason {
    /// Whether this reason keeps the set (the rest explain a removal; for the
    /// newest set [`Reason::MaxAge`] is informational).
    pub fn keeps(&self) -> bool {
        !matches!(self, Self::MaxAge { .. } | Self::NotKept)
    }

    /// The `keep_*` rule behind this reason, if one is.
    pub fn rule(&self) -> Option<Rule> {
        match self {
            Self::KeepLast { .. } => Some(Rule::Last),
            Self::KeepHourly { .. } => Some(Rule::Hourly),
            Self::KeepDaily { .. } => Some(Rule::Daily),
            Self::KeepWeekly { .. } => Some(Rule::Weekly),
            Self::KeepMonthly { .. } => Some(Rule::Monthly),
            Self::Oldest { rule, .. } => Some(*rule),
            _ => None,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Newest => f.write_str("newest set (never removed)"),
            Self::KeepLast { n, of }
            | Self::KeepHourly { n, of }
            | Self::KeepDaily { n, of }
            | Self::KeepWeekly { n, of }
            | Self::KeepMonthly { n, of } => {
                let rule = self.rule().unwrap_or(Rule::Last);
                write!(f, "{rule} ({n} of {of})")
            }
            Self::Oldest { rule, kept, of } => write!(
                f,
                "{rule} (oldest set, kept because the rule found only {kept} of {of})"
            ),
            Self::WithinMaxAge { max_age } => write!(
                f,
                "not older than max_age {} (no keep_* rule set)",
                format_duration(*max_age)
            ),
            Self::RetentionDisabled => {
                f.write_str("retention disabled (no keep_* rule, no max_age)")
            }
            Self::MaxAge { max_age, age } => write!(
                f,
                "older than max_age {} (age {})",
                format_duration(*max_age),
                format_age(*age)
            ),
            Self::NotKept => f.write_str("not kept by any rule"),
            Self::NotUnderstood => f.write_str(
                "not fully understood by this agent, never removed (see list --include-partial)",
            ),
        }
    }
}

/// The verdict on one complete set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The set.
    pub timestamp: SetTimestamp,
    /// Whether it stays.
    pub keep: bool,
    /// Every reason that applies, keeping ones first; never empty.
    pub reasons: Vec<Reason>,
}

impl fmt::Display for Decision {
    /// `keep 2026-11-24_120000: keep_daily (3 of 14), keep_weekly (1 of 8)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.keep { "keep" } else { "remove" };
        write!(f, "{verdict} {}: ", self.timestamp)?;
        for (i, reason) in self.reasons.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{reason}")?;
        }
        Ok(())
    }
}

/// How far `at` lies before `now`; `None` when it is not before it.
fn age(now: DateTime<Utc>, at: DateTime<Utc>) -> Option<Duration> {
    now.signed_duration_since(at)
        .to_std()
        .ok()
        .filter(|d| !d.is_zero())
}

/// Decides every set. Input order does not matter and duplicates are decided
/// once; the output is newest first. See the module documentation for the rules.
pub fn decide(
    policy: &RetentionPolicy,
    sets: &[SetTimestamp],
    now: DateTime<Utc>,
) -> Vec<Decision> {
    let mut sets = sets.to_vec();
    sets.sort_unstable_by(|a, b| b.cmp(a));
    sets.dedup();

    if !policy.is_enabled() {
        return sets
            .into_iter()
            .map(|timestamp| Decision {
                timestamp,
                keep: true,
                reasons: vec![Reason::RetentionDisabled],
            })
            .collect();
    }

    struct Counter {
        rule: Rule,
        of: u32,
        kept: u32,
        last_bucket: Option<i64>,
    }
    let mut counters: Vec<Counter> = policy
        .rules()
        .into_iter()
        .map(|(rule, of)| Counter {
            rule,
            of,
            kept: 0,
            last_bucket: None,
        })
        .collect();

    let oldest = sets.len().saturating_sub(1);
    sets.iter()
        .enumerate()
        .map(|(index, &timestamp)| {
            let at = timestamp.as_datetime();
            let mut reasons = Vec::new();
            if index == 0 {
                reasons.push(Reason::Newest);
            }
            for c in counters.iter_mut().filter(|c| c.kept < c.of) {
                let bucket = c.rule.bucket(at, index);
                if c.last_bucket != Some(bucket) {
                    c.last_bucket = Some(bucket);
                    c.kept += 1;
                    reasons.push(c.rule.reason(c.kept, c.of));
                } else if index == oldest {
                    reasons.push(Reason::Oldest {
                        rule: c.rule,
                        kept: c.kept,
                        of: c.of,
                    });
                    c.kept += 1;
                }
            }
            let too_old = match (policy.max_age, age(now, at)) {
                (Some(max_age), Some(age)) if age > max_age => {
                    Some(Reason::MaxAge { max_age, age })
                }
                _ => None,
            };
            if counters.is_empty() && too_old.is_none() {
                if let Some(max_age) = policy.max_age {
                    reasons.push(Reason::WithinMaxAge { max_age });
                }
            }
            let selected = reasons.iter().any(Reason::keeps);
            if !selected && !counters.is_empty() {
                reasons.push(Reason::NotKept);
            }
            let keep = index == 0 || (selected && too_old.is_none());
            reasons.extend(too_old);
            Decision {
                timestamp,
                keep,
                reasons,
            }
        })
        .collect()
}

/// A leftover the catalog found to be this agent's own: a set directory
/// holding only the `.partial` files it writes for that set, or such files
/// inside a complete set. Nothing else is ever passed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// Where it is, as the caller will remove it.
    pub path: String,
    /// Its modification time, when the destination reports one.
    pub modified: Option<DateTime<Utc>>,
    /// The timestamp of the set it belongs to, when its directory is named like one.
    pub set_timestamp: Option<SetTimestamp>,
}

/// Which leftovers to remove.
///
/// A leftover is stale when it is older than `stale_partial_after` by every age
/// it has: its set timestamp (when the run started) and its modification time
/// (when it was last written). Taking the younger of the two spares a long run
/// that is still writing even when the caller cannot name it. A leftover with
/// neither is never removed: its age is unknown. The leftovers of the set
/// `in_progress` are never removed, however old. Input order is kept.
pub fn stale_leftovers<'a>(
    policy: &RetentionPolicy,
    leftovers: &'a [Leftover],
    in_progress: Option<&SetTimestamp>,
    now: DateTime<Utc>,
) -> Vec<&'a Leftover> {
    leftovers
        .iter()
        .filter(|l| in_progress.is_none() || l.set_timestamp.as_ref() != in_progress)
        .filter(|l| {
            let youngest = [l.set_timestamp.map(|t| t.as_datetime()), l.modified]
                .into_iter()
                .flatten()
                .max();
            youngest
                .and_then(|t| age(now, t))
                .is_some_and(|a| a > policy.stale_partial_after)
        })
        .collect()
}

/// `90d`, `1d 12h`, `30m`: every non-zero unit, for configured durations.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let text: Vec<String> = parts
        .iter()
        .filter(|(v, _)| *v > 0)
        .map(|(v, unit)| format!("{v}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".to_string()
    } else {
        text.join(" ")
    }
}

/// The two largest units of an age (`91d 3h`): enough for a person.
fn format_age(d: Duration) -> String {
    let full = format_duration(d);
    full.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

/// How many sets each decision list keeps and removes; for logs and metrics.
pub fn counts(decisions: &[Decision]) -> (usize, usize) {
    let kept = decisions.iter().filter(|d| d.keep).count();
    (kept, decisions.len() - kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    const DAY: u64 = 86_400;

    fn ts(s: &str) -> SetTimestamp {
        s.parse().unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        ts(s).as_datetime()
    }

    fn kept(decisions: &[Decision]) -> Vec<String> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.timestamp.to_string())
            .collect()
    }

    fn policy(f: impl FnOnce(&mut RetentionPolicy)) -> RetentionPolicy {
        let mut p = RetentionPolicy::default();
        f(&mut p);
        p
    }

    /// Every hour of 2025 at :00, 8760 sets, oldest first.
    fn year_of_hourly_sets() -> Vec<SetTimestamp> {
        let start = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        (0..8760)
            .map(|h| SetTimestamp::new(start + chrono::Duration::hours(h)))
            .collect()
    }

    fn year_now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    /// Gaps of days, several sets in one hour, a Sunday/Monday week boundary,
    /// and 2025-12-31 / 2026-01-01 in the same ISO week (2026-W01).
    const IRREGULAR: [&str; 10] = [
        "2026-03-02_120000", // Monday, ISO week 10
        "2026-03-02_103000",
        "2026-03-02_100500",
        "2026-03-02_100000",
        "2026-03-01_230000", // Sunday, week 9
        "2026-02-27_080000", // Friday, week 9
        "2026-02-15_120000", // Sunday, week 7
        "2026-01-31_235959", // Saturday, week 5
        "2026-01-01_000000", // Thursday, week 1 of 2026
        "2025-12-31_235959", // Wednesday, week 1 of 2026
    ];

    fn irregular() -> Vec<SetTimestamp> {
        // Deliberately not sorted.
        let mut v: Vec<SetTimestamp> = IRREGULAR.iter().map(|s| ts(s)).collect();
        v.reverse();
        v.swap(2, 7);
        v
    }

    fn irregular_now() -> DateTime<Utc> {
        utc("2026-03-02_130000")
    }

    fn pick(indices: &[usize]) -> Vec<String> {
        indices.iter().map(|&i| IRREGULAR[i].to_string()).collect()
    }

    #[test]
    fn each_rule_alone_keeps_the_hand_computed_sets_of_an_irregular_history() {
        type Case = (&'static str, fn(&mut RetentionPolicy), &'static [usize]);
        let cases: &[Case] = &[
            ("keep_last 3", |p| p.keep_last = Some(3), &[0, 1, 2]),
            (
                "keep_last 99",
                |p| p.keep_last = Some(99),
                &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            ),
            ("keep_hourly 3", |p| p.keep_hourly = Some(3), &[0, 1, 4]),
            // 8 distinct hours; the oldest is a bucket of its own.
            (
                "keep_hourly 20",
                |p| p.keep_hourly = Some(20),
                &[0, 1, 4, 5, 6, 7, 8, 9],
            ),
            ("keep_daily 2", |p| p.keep_daily = Some(2), &[0, 4]),
            (
                "keep_daily 10",
                |p| p.keep_daily = Some(10),
                &[0, 4, 5, 6, 7, 8, 9],
            ),
            ("keep_weekly 3", |p| p.keep_weekly = Some(3), &[0, 4, 6]),
            // Week 1 of 2026 holds both 2026-01-01 and 2025-12-31: only five
            // weeks, so the rule is not full and also keeps the oldest set.
            (
                "keep_weekly 10",
                |p| p.keep_weekly = Some(10),
                &[0, 4, 6, 7, 8, 9],
            ),
            ("keep_monthly 2", |p| p.keep_monthly = Some(2), &[0, 5]),
            (
                "keep_monthly 5",
                |p| p.keep_monthly = Some(5),
                &[0, 5, 7, 9],
            ),
            // A rule of 0 is off; with nothing else set, retention is disabled.
            (
                "keep_daily 0",
                |p| p.keep_daily = Some(0),
                &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            ),
            // Only the newest survives a rule of 0 next to keep_last 1.
            (
                "keep_last 1, keep_hourly 0",
                |p| {
                    p.keep_last = Some(1);
                    p.keep_hourly = Some(0);
                },
                &[0],
            ),
        ];
        for (name, set, want) in cases {
            let d = decide(&policy(set), &irregular(), irregular_now());
            assert_eq!(d.len(), IRREGULAR.len(), "{name}");
            assert_eq!(kept(&d), pick(want), "{name}");
        }
    }

    #[test]
    fn rules_combine_as_a_union_with_every_reason_listed() {
        let p = policy(|p| {
            p.keep_last = Some(1);
            p.keep_daily = Some(2);
            p.keep_monthly = Some(3);
        });
        let d = decide(&p, &irregular(), irregular_now());
        assert_eq!(kept(&d), pick(&[0, 4, 5, 7]));
        assert_eq!(
            d[0].reasons,
            vec![
                Reason::Newest,
                Reason::KeepLast { n: 1, of: 1 },
                Reason::KeepDaily { n: 1, of: 2 },
                Reason::KeepMonthly { n: 1, of: 3 },
            ]
        );
        assert_eq!(d[4].reasons, vec![Reason::KeepDaily { n: 2, of: 2 }]);
        assert_eq!(d[5].reasons, vec![Reason::KeepMonthly { n: 2, of: 3 }]);
        assert_eq!(d[7].reasons, vec![Reason::KeepMonthly { n: 3, of: 3 }]);
        assert_eq!(d[1].reasons, vec![Reason::NotKept]);
        assert_eq!(
            d[0].to_string(),
            "keep 2026-03-02_120000: newest set (never removed), keep_last (1 of 1), \
             keep_daily (1 of 2), keep_monthly (1 of 3)"
        );
        assert_eq!(
            d[1].to_string(),
            "remove 2026-03-02_103000: not kept by any rule"
        );
    }

    #[test]
    fn a_rule_that_is_not_full_keeps_the_oldest_set_with_its_own_reason() {
        let p = policy(|p| p.keep_weekly = Some(10));
        let d = decide(&p, &irregular(), irregular_now());
        assert_eq!(d[8].reasons, vec![Reason::KeepWeekly { n: 5, of: 10 }]);
        assert_eq!(
            d[9].reasons,
            vec![Reason::Oldest {
                rule: Rule::Weekly,
                kept: 5,
                of: 10
            }]
        );
        assert_eq!(
            d[9].to_string(),
            "keep 2025-12-31_235959: keep_weekly (oldest set, kept because the rule found only 5 of 10)"
        );
    }

    #[test]
    fn a_year_of_hourly_sets_keeps_the_newest_set_of_each_bucket() {
        let sets = year_of_hourly_sets();
        type Case = (
            &'static str,
            fn(&mut RetentionPolicy),
            usize,
            &'static [&'static str],
        );
        let cases: &[Case] = &[
            (
                "keep_last 24",
                |p| p.keep_last = Some(24),
                24,
                &["2025-12-31_230000", "2025-12-31_000000"],
            ),
            (
                "keep_hourly 48",
                |p| p.keep_hourly = Some(48),
                48,
                &["2025-12-31_230000", "2025-12-30_000000"],
            ),
            (
                "keep_daily 7",
                |p| p.keep_daily = Some(7),
                7,
                &[
                    "2025-12-31_230000",
                    "2025-12-30_230000",
                    "2025-12-29_230000",
                    "2025-12-28_230000",
                    "2025-12-27_230000",
                    "2025-12-26_230000",
                    "2025-12-25_230000",
                ],
            ),
            // ISO weeks end on Sunday; 2025-12-31 is in 2026-W01.
            (
                "keep_weekly 8",
                |p| p.keep_weekly = Some(8),
                8,
                &[
                    "2025-12-31_230000",
                    "2025-12-28_230000",
                    "2025-12-21_230000",
                    "2025-12-14_230000",
                    "2025-12-07_230000",
                    "2025-11-30_230000",
                    "2025-11-23_230000",
                    "2025-11-16_230000",
                ],
            ),
            (
                "keep_monthly 12",
                |p| p.keep_monthly = Some(12),
                12,
                &[
                    "2025-12-31_230000",
                    "2025-11-30_230000",
                    "2025-10-31_230000",
                    "2025-09-30_230000",
                    "2025-08-31_230000",
                    "2025-07-31_230000",
                    "2025-06-30_230000",
                    "2025-05-31_230000",
                    "2025-04-30_230000",
                    "2025-03-31_230000",
                    "2025-02-28_230000",
                    "2025-01-31_230000",
                ],
            ),
            // Only 12 months exist: the oldest set is kept as well.
            (
                "keep_monthly 13",
                |p| p.keep_monthly = Some(13),
                13,
                &["2025-01-31_230000", "2025-01-01_000000"],
            ),
            (
                "keep_daily 400",
                |p| p.keep_daily = Some(400),
                366,
                &["2025-01-01_230000", "2025-01-01_000000"],
            ),
            // 48 hourly; 12 more days; weeks of Dec 14, 7, Nov 30, 23, 16; ten more months.
            (
                "keep_last 24 hourly 48 daily 14 weekly 8 monthly 12",
                |p| {
                    p.keep_last = Some(24);
                    p.keep_hourly = Some(48);
                    p.keep_daily = Some(14);
                    p.keep_weekly = Some(8);
                    p.keep_monthly = Some(12);
                },
                75,
                &[
                    "2025-12-18_230000",
                    "2025-11-16_230000",
                    "2025-01-31_230000",
                ],
            ),
            // 90 days before 2026-01-01 is 2025-10-03_000000, exactly 90d old: kept.
            (
                "max_age 90d",
                |p| p.max_age = Some(Duration::from_secs(90 * DAY)),
                90 * 24,
                &["2025-10-03_000000"],
            ),
            (
                "keep_monthly 12, max_age 90d",
                |p| {
                    p.keep_monthly = Some(12);
                    p.max_age = Some(Duration::from_secs(90 * DAY));
                },
                3,
                &[
                    "2025-12-31_230000",
                    "2025-11-30_230000",
                    "2025-10-31_230000",
                ],
            ),
            ("disabled", |_| {}, 8760, &["2025-01-01_000000"]),
        ];
        for (name, set, count, must_keep) in cases {
            let d = decide(&policy(set), &sets, year_now());
            assert_eq!(d.len(), 8760, "{name}");
            let k = kept(&d);
            assert_eq!(k.len(), *count, "{name}");
            for want in *must_keep {
                assert!(k.iter().any(|s| s == want), "{name}: {want} not kept");
            }
            // Whole-list checks where the list is given in full.
            if must_keep.len() == *count {
                assert_eq!(k, must_keep.to_vec(), "{name}");
            }
        }
    }

    #[test]
    fn max_age_alone_keeps_exactly_the_younger_sets() {
        let p = policy(|p| p.max_age = Some(Duration::from_secs(30 * DAY)));
        // 30 days before 2026-03-02_130000 is 2026-01-31_130000.
        let d = decide(&p, &irregular(), irregular_now());
        assert_eq!(kept(&d), pick(&[0, 1, 2, 3, 4, 5, 6, 7]));
        assert_eq!(
            d[1].reasons,
            vec![Reason::WithinMaxAge {
                max_age: Duration::from_secs(30 * DAY)
            }]
        );
        assert!(!d[8].keep);
        assert_eq!(
            d[8].to_string(),
            "remove 2026-01-01_000000: older than max_age 30d (age 60d 13h)"
        );
    }

    #[test]
    fn max_age_removes_sets_a_keep_rule_would_keep() {
        let p = policy(|p| {
            p.keep_monthly = Some(5);
            p.max_age = Some(Duration::from_secs(30 * DAY));
        });
        let d = decide(&p, &irregular(), irregular_now());
        assert_eq!(kept(&d), pick(&[0, 5, 7]));
        assert!(!d[9].keep);
        assert_eq!(
            d[9].reasons,
            vec![
                Reason::KeepMonthly { n: 4, of: 5 },
                Reason::MaxAge {
                    max_age: Duration::from_secs(30 * DAY),
                    age: Duration::from_secs(60 * DAY + 13 * 3600 + 1),
                },
            ]
        );
        // Old and not kept by any rule: both said.
        assert_eq!(
            d[8].reasons,
            vec![
                Reason::NotKept,
                Reason::MaxAge {
                    max_age: Duration::from_secs(30 * DAY),
                    age: Duration::from_secs(60 * DAY + 13 * 3600),
                },
            ]
        );
    }

    #[test]
    fn the_newest_set_survives_max_age_and_every_rule() {
        let p = policy(|p| {
            p.keep_last = Some(3);
            p.max_age = Some(Duration::from_secs(DAY));
        });
        let now = utc("2027-01-01_000000");
        let d = decide(&p, &irregular(), now);
        assert_eq!(kept(&d), pick(&[0]));
        assert!(d[0]
            .reasons
            .starts_with(&[Reason::Newest, Reason::KeepLast { n: 1, of: 3 }]));
        assert!(matches!(d[0].reasons.last(), Some(Reason::MaxAge { .. })));

        let only_age = policy(|p| p.max_age = Some(Duration::from_secs(60)));
        let d = decide(&only_age, &irregular(), now);
        assert_eq!(kept(&d), pick(&[0]));
        assert!(d[0].reasons.contains(&Reason::Newest));
    }

    #[test]
    fn sets_in_the_future_are_not_old() {
        let p = policy(|p| p.max_age = Some(Duration::from_secs(60)));
        let d = decide(&p, &irregular(), utc("2026-03-02_100200"));
        // 12:00, 10:30 and 10:05 are after `now`: no age. 10:00 is 2 minutes old.
        assert_eq!(kept(&d), pick(&[0, 1, 2]));
    }

    #[test]
    fn disabled_retention_keeps_everything() {
        let p = RetentionPolicy::default();
        assert!(!p.is_enabled());
        let d = decide(&p, &irregular(), irregular_now());
        assert!(d
            .iter()
            .all(|d| d.keep && d.reasons == [Reason::RetentionDisabled]));
        assert!(!policy(|p| p.keep_daily = Some(0)).is_enabled());
        assert!(policy(|p| p.keep_daily = Some(1)).is_enabled());
        assert!(policy(|p| p.max_age = Some(Duration::from_secs(DAY))).is_enabled());
    }

    #[test]
    fn empty_and_duplicate_inputs() {
        let p = policy(|p| p.keep_last = Some(2));
        assert!(decide(&p, &[], irregular_now()).is_empty());
        let a = ts("2026-01-01_000000");
        let b = ts("2026-01-02_000000");
        let d = decide(&p, &[a, b, a, b, a], irregular_now());
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|d| d.keep));
    }

    /// restic's rule, restated without the walk: group the sets into buckets,
    /// keep the newest set of each of the `n` newest buckets, and the oldest set
    /// when there are fewer than `n` buckets.
    fn oracle(rule: Rule, n: u32, newest_first: &[SetTimestamp]) -> Vec<SetTimestamp> {
        let mut buckets: BTreeMap<i64, SetTimestamp> = BTreeMap::new();
        for (i, t) in newest_first.iter().enumerate() {
            buckets.entry(rule.bucket(t.as_datetime(), i)).or_insert(*t);
        }
        let bucket_count = buckets.len();
        let mut out: Vec<SetTimestamp> = buckets.into_values().rev().take(n as usize).collect();
        if bucket_count < n as usize {
            out.extend(newest_first.last().copied());
        }
        out.sort_unstable_by(|a, b| b.cmp(a));
        out.dedup();
        out
    }

    fn random_sets(rng: &mut StdRng) -> Vec<SetTimestamp> {
        let base = Utc
            .with_ymd_and_hms(2024, 12, 20, 0, 0, 0)
            .unwrap()
            .timestamp();
        let count = rng.random_range(0..300);
        let span =
            [3600 * 6, DAY as i64 * 3, DAY as i64 * 60, DAY as i64 * 800][rng.random_range(0..4)];
        (0..count)
            .map(|_| {
                let t = base + rng.random_range(0..span);
                SetTimestamp::new(DateTime::from_timestamp(t, 0).unwrap())
            })
            .collect()
    }

    fn random_policy(rng: &mut StdRng) -> RetentionPolicy {
        let count = |rng: &mut StdRng| rng.random_bool(0.4).then(|| rng.random_range(0..30));
        RetentionPolicy {
            keep_last: count(rng),
            keep_hourly: count(rng),
            keep_daily: count(rng),
            keep_weekly: count(rng),
            keep_monthly: count(rng),
            max_age: rng
                .random_bool(0.3)
                .then(|| Duration::from_secs(rng.random_range(1..DAY * 400))),
            stale_partial_after: DEFAULT_STALE_PARTIAL_AFTER,
        }
    }

    #[test]
    fn random_policies_keep_the_newest_give_reasons_and_ignore_input_order() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        for round in 0..400 {
            let p = random_policy(&mut rng);
            let mut sets = random_sets(&mut rng);
            let now = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
            let d = decide(&p, &sets, now);

            let mut distinct = sets.clone();
            distinct.sort_unstable_by(|a, b| b.cmp(a));
            distinct.dedup();
            let order: Vec<SetTimestamp> = d.iter().map(|d| d.timestamp).collect();
            assert_eq!(order, distinct, "round {round}: not newest first");

            if let Some(first) = d.first() {
                assert!(first.keep, "round {round}: newest removed under {p:?}");
                if p.is_enabled() {
                    assert_eq!(first.reasons[0], Reason::Newest, "round {round}");
                }
            }
            for x in &d {
                assert!(!x.reasons.is_empty(), "round {round}: {x:?}");
                if x.keep {
                    assert!(x.reasons.iter().any(Reason::keeps), "round {round}: {x:?}");
                } else {
                    assert!(x.reasons.iter().any(|r| !r.keeps()), "round {round}: {x:?}");
                }
                let newest = x.timestamp == distinct[0];
                if let (false, true, Some(max)) = (newest, x.keep, p.max_age) {
                    let age = age(now, x.timestamp.as_datetime()).unwrap_or_default();
                    assert!(age <= max, "round {round}: {x:?} kept past max_age");
                }
            }

            // Deterministic and order-independent.
            assert_eq!(decide(&p, &sets, now), d, "round {round}");
            sets.shuffle(&mut rng);
            assert_eq!(decide(&p, &sets, now), d, "round {round}: order mattered");

            // Without max_age, the kept sets are the newest plus the union of
            // what each rule keeps on its own, as restated by the oracle.
            if p.max_age.is_none() && p.is_enabled() {
                let mut want: Vec<SetTimestamp> = p
                    .rules()
                    .into_iter()
                    .flat_map(|(rule, n)| oracle(rule, n, &distinct))
                    .chain(distinct.first().copied())
                    .collect();
                want.sort_unstable_by(|a, b| b.cmp(a));
                want.dedup();
                let got: Vec<SetTimestamp> =
                    d.iter().filter(|d| d.keep).map(|d| d.timestamp).collect();
                assert_eq!(got, want, "round {round}: {p:?}");
            }
        }
    }

    #[test]
    fn validation_rejects_zero_max_age_and_a_short_partial_age() {
        assert_eq!(
            RetentionPolicy::default().validated(),
            Ok(RetentionPolicy::default())
        );
        let zero = policy(|p| p.max_age = Some(Duration::ZERO))
            .validated()
            .unwrap_err();
        assert_eq!(zero, RetentionError::ZeroMaxAge);
        assert_eq!(zero.field(), "max_age");
        let short = policy(|p| p.stale_partial_after = Duration::from_secs(59))
            .validated()
            .unwrap_err();
        assert_eq!(short.field(), "stale_partial_after");
        assert!(short.to_string().contains("59s"), "{short}");
        assert!(policy(|p| {
            p.keep_daily = Some(0);
            p.stale_partial_after = Duration::from_secs(60);
        })
        .validated()
        .is_ok());
    }

    #[test]
    fn durations_parse_with_day_and_week_units() {
        assert_eq!(
            parse_duration("max_age", "90d"),
            Ok(Duration::from_secs(90 * DAY))
        );
        assert_eq!(
            parse_duration("max_age", "2w"),
            Ok(Duration::from_secs(14 * DAY))
        );
        assert_eq!(
            parse_duration("max_age", " 36h "),
            Ok(Duration::from_secs(36 * 3600))
        );
        assert_eq!(
            parse_duration("stale_partial_after", "1h 30m"),
            Ok(Duration::from_secs(5400))
        );
        let e = parse_duration("max_age", "90").unwrap_err();
        assert_eq!(e.field(), "max_age");
        assert!(e.to_string().contains("\"90d\""), "{e}");
        assert_eq!(format_duration(Duration::from_secs(90 * DAY)), "90d");
        assert_eq!(
            format_duration(Duration::from_secs(DAY + 12 * 3600)),
            "1d 12h"
        );
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    fn leftover(path: &str, modified: Option<&str>, set: Option<&str>) -> Leftover {
        Leftover {
            path: path.to_string(),
            modified: modified.map(utc),
            set_timestamp: set.map(ts),
        }
    }

    #[test]
    fn stale_leftovers_by_set_timestamp_or_modification_time() {
        let p = RetentionPolicy::default(); // 1h
        let now = utc("2026-03-02_120000");
        let list = [
            leftover("old-ts", None, Some("2026-03-02_105959")),
            leftover("exactly-1h", None, Some("2026-03-02_110000")),
            leftover("young-ts", None, Some("2026-03-02_113000")),
            leftover("old-mtime", Some("2026-03-02_100000"), None),
            leftover("young-mtime", Some("2026-03-02_115000"), None),
            // Started long ago but written to a minute ago: a run still writing.
            leftover(
                "old-ts-young-mtime",
                Some("2026-03-02_115900"),
                Some("2026-03-01_000000"),
            ),
            leftover(
                "both-old",
                Some("2026-03-02_100000"),
                Some("2026-03-01_000000"),
            ),
            leftover("no-age", None, None),
            leftover("future", None, Some("2026-03-03_000000")),
        ];
        let got: Vec<&str> = stale_leftovers(&p, &list, None, now)
            .into_iter()
            .map(|l| l.path.as_str())
            .collect();
        assert_eq!(got, ["old-ts", "old-mtime", "both-old"]);
    }

    #[test]
    fn stale_leftovers_spare_the_run_in_progress() {
        let p = policy(|p| p.stale_partial_after = Duration::from_secs(600));
        let now = utc("2026-03-02_120000");
        let running = ts("2026-03-02_080000");
        let list = [
            leftover(
                "running/snapshot.db.partial",
                Some("2026-03-02_090000"),
                Some("2026-03-02_080000"),
            ),
            leftover("running", None, Some("2026-03-02_080000")),
            leftover("crashed", None, Some("2026-03-02_070000")),
            leftover("stray.partial", Some("2026-03-02_070000"), None),
        ];
        let got: Vec<&str> = stale_leftovers(&p, &list, Some(&running), now)
            .into_iter()
            .map(|l| l.path.as_str())
            .collect();
        assert_eq!(got, ["crashed", "stray.partial"]);
        let all: Vec<&str> = stale_leftovers(&p, &list, None, now)
            .into_iter()
            .map(|l| l.path.as_str())
            .collect();
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn counts_split_kept_and_removed() {
        let p = policy(|p| p.keep_last = Some(3));
        assert_eq!(counts(&decide(&p, &irregular(), irregular_now())), (3, 7));
    }
}
