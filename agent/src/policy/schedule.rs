//! When scheduled backups fire: a cron expression in a time zone, a random
//! start delay (jitter), and the loop that sleeps until each fire time.
//!
//! Schedules are by the minute: five fields (minute hour day-of-month month
//! day-of-week) or an `@alias`. Seconds and year fields are refused. The one
//! exception is `@every <duration>` (`@every 30m`): it fires at every whole
//! multiple of the duration since 1970-01-01 UTC, so every agent of a cluster
//! fires at the same instants whenever each started (leader coordination
//! relies on that), and the time zone does not apply to it.
//!
//! # Daylight saving time
//!
//! Fire times are computed by [`croner`] on the wall clock of the schedule's
//! zone, and always move forward in real time:
//! - A job at a fixed time of day (single minute and hour, e.g. `30 2 * * *`)
//!   whose time falls in a spring-forward gap fires once, at the first instant
//!   after the gap (02:30 Europe/Berlin on 2026-03-29 fires at 03:00 CEST). On a
//!   fall-back day, when its time happens twice, it fires once, on the first
//!   pass (02:30 CEST, not again at 02:30 CET).
//! - A job with a wildcard, list, range or step in its minute or hour
//!   (`0 * * * *`, `*/15 * * * *`) skips wall clock times inside a gap and fires
//!   on both passes of a repeated hour, so an hourly job fires every real hour
//!   across both changes: no burst, no two-hour gap.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use rand::Rng;
use tokio_util::sync::CancellationToken;

/// The longest the scheduler sleeps before reading the clock again. Sleeping is
/// measured on the monotonic clock, so this bounds how late a fire is when the
/// wall clock jumps forward (or the host was suspended).
const CLOCK_RECHECK: Duration = Duration::from_secs(60);

/// At most this many skipped fire times are counted for the log after the
/// wall clock passed several at once.
const MAX_SKIPPED_COUNT: usize = 1000;

/// The expected shape, repeated in error messages.
const EXPECTED_FIELDS: &str =
    "expected 5 fields (minute hour day-of-month month day-of-week) or @hourly/@daily/@weekly";

/// The five fields: name, and what they allow (for error messages).
const FIELDS: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31, L (last) or NW (weekday nearest N)"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT (0 and 7 are Sunday)"),
];

/// Why a schedule or time zone was refused. The message is for a person: it
/// names the problem and gives an example of what works.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The cron expression is malformed, uses seconds or years, or never fires.
    #[error("invalid cron expression {expr:?}: {reason}")]
    Expression {
        /// The expression as given.
        expr: String,
        /// What is wrong with it and what would work.
        reason: String,
    },
    /// The time zone is not an IANA time zone name.
    #[error("unknown time zone {timezone:?}; {reason}")]
    TimeZone {
        /// The time zone as given.
        timezone: String,
        /// What would work.
        reason: String,
    },
}

/// A parsed schedule in a time zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The expression as given (trimmed), for logs.
    expr: String,
    /// The zone whose wall clock the expression is read on.
    zone: Tz,
    /// When it fires.
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// The parsed five-field expression (aliases already expanded).
    Cron(Box<Cron>),
    /// `@every <duration>`: at every whole multiple of it since the Unix epoch.
    Every(Duration),
}

/// The shortest `@every` interval.
const MIN_EVERY: Duration = Duration::from_secs(1);

impl Schedule {
    /// Parses a 5-field cron expression or an @alias (`@hourly`, `@daily`,
    /// `@midnight`, `@weekly`, `@monthly`, `@yearly`, `@annually`), read on the
    /// wall clock of `timezone` (an IANA name; `None` means UTC).
    ///
    /// # Errors
    ///
    /// [`ScheduleError::Expression`] for a wrong number of fields
    /// (including 6- and 7-field expressions with seconds or years: backups are
    /// scheduled by the minute), an unknown alias, a bad field (the message
    /// names the field and its allowed values), or an expression that can never
    /// fire (`0 0 31 2 *`); [`ScheduleError::TimeZone`] for a zone that is
    /// not an IANA name.
    pub fn parse(expr: &str, timezone: Option<&str>) -> Result<Self, ScheduleError> {
        let zone = match timezone {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| ScheduleError::TimeZone {
                timezone: name.to_string(),
                reason: time_zone_hint(name),
            })?,
        };
        let trimmed = expr.trim();
        let invalid = |reason: String| ScheduleError::Expression {
            expr: expr.to_string(),
            reason,
        };
        if let Some(every) = every_duration(trimmed) {
            return Ok(Schedule {
                expr: trimmed.to_string(),
                zone,
                kind: Kind::Every(every.map_err(invalid)?),
            });
        }
        let five_fields = expand_alias(trimmed).map_err(invalid)?;
        check_field_count(five_fields).map_err(invalid)?;
        let cron = minute_parser()
            .parse(five_fields)
            .map_err(|e| invalid(explain_cron_error(five_fields, &e)))?;
        let schedule = Schedule {
            expr: trimmed.to_string(),
            zone,
            kind: Kind::Cron(Box::new(cron)),
        };
        // Without a year field, an expression that fires at all fires within
        // every 400-year Gregorian cycle, so a fixed start gives a fixed answer.
        // croner gives up on an impossible date after about 0.1s of searching.
        if schedule.next_after(DateTime::UNIX_EPOCH).is_none() {
            return Err(invalid(
                "it never fires (no month has that day, or day-of-month and day-of-week \
                 never meet); check the day-of-month and month fields, e.g. \"0 2 1 * *\""
                    .to_string(),
            ));
        }
        Ok(schedule)
    }

    /// The first fire time strictly after `t`; `None` if there is none (only
    /// from the year 5000 on, where croner stops searching).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let cron = match &self.kind {
            Kind::Cron(cron) => cron,
            Kind::Every(every) => {
                let step = i64::try_from(every.as_millis()).ok()?;
                let next = t
                    .timestamp_millis()
                    .div_euclid(step)
                    .checked_add(1)?
                    .checked_mul(step)?;
                return DateTime::from_timestamp_millis(next);
            }
        };
        let mut from = t.with_timezone(&self.zone);
        // croner searches whole seconds from the second after `from`, so its
        // answer is always later; the loop only guards that contract.
        for _ in 0..3 {
            let next = cron.find_next_occurrence(&from, false).ok()?;
            if next.with_timezone(&Utc) > t {
                return Some(next.with_timezone(&Utc));
            }
            from = next;
        }
        None
    }

    /// The schedule's interval around `t`: the time between the first fire
    /// after `t` and the one after it. Used to ask "is the newest backup older
    /// than one schedule interval". Across a DST change this is the real time
    /// between the two fires (23h or 25h for a daily job).
    pub fn interval_at(&self, t: DateTime<Utc>) -> Option<Duration> {
        let first = self.next_after(t)?;
        let second = self.next_after(first)?;
        (second - first).to_std().ok()
    }

    /// The expression and zone as given, for logs: `"0 * * * *" in UTC`.
    pub fn describe(&self) -> String {
        format!("{:?} in {}", self.expr, self.zone.name())
    }

    /// The expression as given (trimmed).
    pub fn expression(&self) -> &str {
        &self.expr
    }

    /// The zone whose wall clock the expression is read on.
    pub fn timezone(&self) -> Tz {
        self.zone
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What to do about an unknown time zone: the right spelling when only the
/// case is wrong (IANA names are case-sensitive), else the usual advice.
fn time_zone_hint(name: &str) -> String {
    let wanted = name.trim();
    match chrono_tz::TZ_VARIANTS
        .iter()
        .find(|tz| tz.name().eq_ignore_ascii_case(wanted))
    {
        Some(tz) => format!(
            "did you mean {:?}? IANA names are case-sensitive",
            tz.name()
        ),
        None => "use an IANA name such as UTC or Europe/Berlin".to_string(),
    }
}

/// A parser for minute-granular, five-field expressions only.
fn minute_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
}

/// Expands an `@alias` to its five fields; anything else is returned as is.
/// Done here rather than by croner, which does not know `@midnight` and
/// would give a field-count error for an unknown alias.
fn expand_alias(expr: &str) -> Result<&str, String> {
    if !expr.starts_with('@') {
        return Ok(expr);
    }
    match expr.to_ascii_lowercase().as_str() {
        "@hourly" => Ok("0 * * * *"),
        "@daily" | "@midnight" => Ok("0 0 * * *"),
        "@weekly" => Ok("0 0 * * 0"),
        "@monthly" => Ok("0 0 1 * *"),
        "@yearly" | "@annually" => Ok("0 0 1 1 *"),
        _ => Err(
            "unknown alias; use @hourly, @daily (or @midnight), @weekly, @monthly, \
                  @yearly (or @annually), @every <duration>, or 5 fields such as \"0 * * * *\""
                .to_string(),
        ),
    }
}

/// `Some` when `expr` is an `@every` schedule: its interval, or why it is
/// refused. Whole seconds only, since a set is named by the second it started.
fn every_duration(expr: &str) -> Option<Result<Duration, String>> {
    let (word, rest) = expr.split_once(char::is_whitespace).unwrap_or((expr, ""));
    if !word.eq_ignore_ascii_case("@every") {
        return None;
    }
    let rest = rest.trim();
    let hint = "give a duration with a unit, such as \"@every 30m\" or \"@every 1h\"";
    Some(match humantime::parse_duration(rest) {
        _ if rest.is_empty() => Err(format!("@every needs a duration; {hint}")),
        Err(e) => Err(format!("invalid duration {rest:?}: {e}; {hint}")),
        Ok(d) if d < MIN_EVERY || d.subsec_nanos() != 0 => Err(format!(
            "{rest:?} is not a whole number of seconds of at least 1s; {hint}"
        )),
        Ok(d) => Ok(d),
    })
}

/// Refuses anything but five fields, with a specific word for seconds and
/// years, which croner would accept with other settings.
fn check_field_count(expr: &str) -> Result<(), String> {
    match expr.split_whitespace().count() {
        5 => Ok(()),
        0 => Err(format!("it is empty; {EXPECTED_FIELDS}")),
        6 => Err(format!(
            "6 fields: a seconds (or year) field is not supported, backups are scheduled \
             by the minute; {EXPECTED_FIELDS}, such as \"0 * * * *\""
        )),
        7 => Err(format!(
            "7 fields: seconds and year fields are not supported, backups are scheduled \
             by the minute; {EXPECTED_FIELDS}, such as \"0 * * * *\""
        )),
        _ => Err(EXPECTED_FIELDS.to_string()),
    }
}

/// Turns croner's error for a five-field expression into a reason that names
/// the bad field: croner's own messages ("Number out of bounds.") do not.
fn explain_cron_error(expr: &str, whole: &CronError) -> String {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let parser = minute_parser();
    for (i, (name, allowed)) in FIELDS.iter().enumerate() {
        let mut probe = ["*"; 5];
        probe[i] = fields[i];
        if let Err(e) = parser.parse(&probe.join(" ")) {
            return format!(
                "{name} field {:?}: {}; allowed: {allowed}, with lists (1,5), ranges (1-5) \
                 and steps (*/15)",
                fields[i],
                cron_problem(&e)
            );
        }
    }
    cron_problem(whole)
}

/// croner's description of a problem, without its type prefix.
fn cron_problem(e: &CronError) -> String {
    match e {
        CronError::ComponentError(msg) => {
            let msg = msg.trim_end_matches('.');
            let mut chars = msg.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => "invalid value".to_string(),
            }
        }
        CronError::IllegalCharacters(_) => "contains a character that is not allowed".to_string(),
        other => other.to_string(),
    }
}

/// Where "now" comes from: the wall clock in production, tokio's (pausable)
/// clock in tests.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Follows `tokio::time::Instant` from a fixed UTC start, so
/// `tokio::time::pause()`/`advance()` move it.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: DateTime<Utc>,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that reads `t` now and moves with tokio's clock from here on.
    pub fn starting_at(t: DateTime<Utc>) -> Self {
        TokioClock {
            start: t,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = TimeDelta::from_std(self.origin.elapsed()).unwrap_or(TimeDelta::MAX);
        self.start
            .checked_add_signed(elapsed)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

/// A uniformly random delay in `[0, jitter]`. Kept out of the async loop:
/// the thread-local generator must not be held across an await.
fn random_delay(jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return Duration::ZERO;
    }
    let max = u64::try_from(jitter.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=max))
}

/// The scheduler loop. Until `shutdown` is cancelled: computes the next fire
/// time after now (and strictly after the previous fire, so a fire time is
/// never used twice even if the clock went back), reports it through
/// `on_next`, sleeps until then plus a uniformly random delay in
/// `[0, jitter]`, then calls `fire` with the scheduled instant.
///
/// `fire` must not block: the daemon's starts a backup in the background, or
/// counts a skip. If there is no next fire time, this logs and returns.
///
/// The clock is read again after each sleep, and sleeps last at most a minute:
/// - if the wall clock jumps backwards, the loop waits for the wall clock to
///   reach the fire time again, and never fires twice for one instant;
/// - if it jumps forward past several fire times (or the host was suspended),
///   it fires once, for the instant it was waiting for, logs how many were
///   skipped, and goes on from the next fire time after now: no burst.
///
/// A jitter longer than the schedule's interval makes the fires that fall
/// inside the delay skipped the same way; config validation should keep it
/// shorter.
pub async fn run_scheduler(
    schedule: Schedule,
    jitter: Duration,
    clock: Arc<dyn Clock>,
    on_next: impl Fn(DateTime<Utc>) + Send,
    fire: impl Fn(DateTime<Utc>) + Send,
    shutdown: CancellationToken,
) {
    tracing::info!(
        schedule = %schedule.describe(),
        jitter = ?jitter,
        "scheduler started"
    );
    let mut last_fired: Option<DateTime<Utc>> = None;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let now = clock.now();
        let after = match last_fired {
            Some(prev) if prev > now => {
                tracing::warn!(
                    now = %now,
                    last_fired = %prev,
                    "wall clock is behind the last fire time (it went back); \
                     waiting for the next fire time after the last one"
                );
                prev
            }
            _ => now,
        };
        let Some(next) = schedule.next_after(after) else {
            tracing::error!(
                schedule = %schedule.describe(),
                after = %after,
                "the schedule has no fire time after this; scheduler stopped"
            );
            return;
        };
        on_next(next);
        let delay = random_delay(jitter);
        let target = TimeDelta::from_std(delay)
            .ok()
            .and_then(|d| next.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        tracing::debug!(next = %next, delay = ?delay, "waiting for the next scheduled time");

        let woke_at = loop {
            let now = clock.now();
            if now >= target {
                break now;
            }
            let wait = (target - now)
                .to_std()
                .unwrap_or(CLOCK_RECHECK)
                .min(CLOCK_RECHECK);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    tracing::info!("scheduler stopped");
                    return;
                }
                () = tokio::time::sleep(wait) => {}
            }
        };

        let skipped = count_skipped(&schedule, next, woke_at);
        if skipped > 0 {
            tracing::warn!(
                scheduled = %next,
                now = %woke_at,
                skipped,
                "the wall clock passed several scheduled times at once (clock jump or \
                 suspended host); firing once"
            );
        }
        tracing::info!(scheduled = %next, delay = ?delay, "scheduled backup is due");
        fire(next);
        last_fired = Some(next);
    }
    tracing::info!("scheduler stopped");
}

/// How many fire times after `fired` are already at or before `now`
/// (at most [`MAX_SKIPPED_COUNT`]).
fn count_skipped(schedule: &Schedule, fired: DateTime<Utc>, now: DateTime<Utc>) -> usize {
    let mut count = 0;
    let mut t = fired;
    while count < MAX_SKIPPED_COUNT {
        match schedule.next_after(t) {
            Some(next) if next <= now => {
                count += 1;
                t = next;
            }
            _ => break,
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::sync::Mutex;
    use tracing::Instrument;

    /// A UTC instant from its parts.
    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("a valid UTC time")
    }

    fn parse(expr: &str, tz: Option<&str>) -> Schedule {
        Schedule::parse(expr, tz).unwrap_or_else(|e| panic!("{expr:?} must parse: {e}"))
    }

    fn parse_err(expr: &str, tz: Option<&str>) -> String {
        match Schedule::parse(expr, tz) {
            Ok(s) => panic!("{expr:?} must not parse, got {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn hours(h: u64) -> Duration {
        Duration::from_secs(h * 3600)
    }

    fn minutes(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    /// The fire times after `from`, in order, until `until` (exclusive).
    fn fires_between(
        s: &Schedule,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = from;
        while let Some(next) = s.next_after(t) {
            if next >= until {
                break;
            }
            out.push(next);
            t = next;
        }
        out
    }

    #[test]
    fn parse_accepts_five_fields_and_aliases() {
        for expr in [
            "0 * * * *",
            "*/15 * * * *",
            "30 2 * * *",
            "0 3 * * 1",
            "0 3 * * MON-FRI",
            "0 0 1,15 JAN-JUN *",
            "0 0 L * *",
            "  5 4 * * sun  ",
            "@hourly",
            "@daily",
            "@midnight",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
            "@DAILY",
        ] {
            parse(expr, None);
        }
        let s = parse("0 * * * *", Some("Europe/Berlin"));
        assert_eq!(s.timezone(), chrono_tz::Europe::Berlin);
        assert_eq!(s.describe(), "\"0 * * * *\" in Europe/Berlin");
        assert_eq!(parse(" @daily ", None).describe(), "\"@daily\" in UTC");
        assert_eq!(parse("@daily", None).to_string(), "\"@daily\" in UTC");
    }

    #[test]
    fn parse_aliases_mean_what_cron_means() {
        let from = utc(2026, 1, 1, 12, 34, 0); // a Thursday
        let cases = [
            ("@hourly", utc(2026, 1, 1, 13, 0, 0)),
            ("@daily", utc(2026, 1, 2, 0, 0, 0)),
            ("@midnight", utc(2026, 1, 2, 0, 0, 0)),
            ("@weekly", utc(2026, 1, 4, 0, 0, 0)), // Sunday
            ("@monthly", utc(2026, 2, 1, 0, 0, 0)),
            ("@yearly", utc(2027, 1, 1, 0, 0, 0)),
            ("@annually", utc(2027, 1, 1, 0, 0, 0)),
        ];
        for (alias, want) in cases {
            assert_eq!(parse(alias, None).next_after(from), Some(want), "{alias}");
        }
    }

    #[test]
    fn parse_wrong_field_count_gives_the_expected_shape() {
        assert_eq!(
            parse_err("0 * *", None),
            "invalid cron expression \"0 * *\": expected 5 fields (minute hour \
             day-of-month month day-of-week) or @hourly/@daily/@weekly"
        );
        assert!(parse_err("", None).contains("it is empty; expected 5 fields"));
        assert!(parse_err("0 * * * * * * *", None).contains("expected 5 fields"));
    }

    #[test]
    fn parse_refuses_seconds_and_years_explicitly() {
        let six = parse_err("0 0 * * * *", None);
        assert!(
            six.starts_with("invalid cron expression \"0 0 * * * *\": 6 fields"),
            "{six}"
        );
        assert!(six.contains("seconds"), "{six}");
        assert!(six.contains("by the minute"), "{six}");
        let seven = parse_err("0 0 0 * * * 2026", None);
        assert!(seven.contains("7 fields: seconds and year"), "{seven}");
    }

    #[test]
    fn parse_out_of_range_values_name_the_field() {
        let cases = [
            (
                "61 * * * *",
                "minute field \"61\": number out of bounds; allowed: 0-59",
            ),
            (
                "0 24 * * *",
                "hour field \"24\": number out of bounds; allowed: 0-23",
            ),
            (
                "0 0 32 * *",
                "day-of-month field \"32\": number out of bounds; allowed: 1-31",
            ),
            ("0 0 0 * *", "day-of-month field \"0\""),
            (
                "0 0 * 13 *",
                "month field \"13\": number out of bounds; allowed: 1-12",
            ),
            (
                "0 0 * * 8",
                "day-of-week field \"8\": number out of bounds; allowed: 0-7",
            ),
            ("*/0 * * * *", "minute field \"*/0\": step cannot be zero"),
            ("5-1 * * * *", "minute field \"5-1\""),
        ];
        for (expr, want) in cases {
            let got = parse_err(expr, None);
            assert!(
                got.starts_with(&format!("invalid cron expression {expr:?}: {want}")),
                "{expr}: {got}"
            );
            assert!(got.contains("such as") || got.contains("(*/15)"), "{got}");
        }
    }

    #[test]
    fn parse_garbage_and_unknown_aliases_are_refused() {
        let got = parse_err("every hour", None);
        assert!(got.contains("expected 5 fields"), "{got}");
        let got = parse_err("a b c d e", None);
        assert_eq!(
            got,
            "invalid cron expression \"a b c d e\": minute field \"a\": contains a character \
             that is not allowed; allowed: 0-59, with lists (1,5), ranges (1-5) and steps (*/15)"
        );
        let got = parse_err("0 0 * * FUNDAY", None);
        assert!(got.contains("day-of-week field \"FUNDAY\""), "{got}");
        let got = parse_err("@minutely", None);
        assert!(
            got.starts_with("invalid cron expression \"@minutely\": unknown alias; use @hourly"),
            "{got}"
        );
    }

    #[test]
    fn every_fires_at_multiples_of_its_interval_since_the_epoch() {
        let s = parse("@every 5s", None);
        assert_eq!(
            s.next_after(utc(2026, 5, 1, 10, 17, 33)),
            Some(utc(2026, 5, 1, 10, 17, 35))
        );
        // Strictly after: a fire time is not its own next one.
        assert_eq!(
            s.next_after(utc(2026, 5, 1, 10, 17, 35)),
            Some(utc(2026, 5, 1, 10, 17, 40))
        );
        assert_eq!(
            s.next_after(utc(2026, 5, 1, 10, 17, 34) + TimeDelta::milliseconds(999)),
            Some(utc(2026, 5, 1, 10, 17, 35))
        );
        assert_eq!(
            s.interval_at(utc(2026, 5, 1, 0, 0, 0)),
            Some(Duration::from_secs(5))
        );
        // The same instants whatever the time zone: agents agree on a tick.
        let berlin = parse("@every 30m", Some("Europe/Berlin"));
        assert_eq!(
            berlin.next_after(utc(2026, 3, 29, 0, 40, 0)),
            Some(utc(2026, 3, 29, 1, 0, 0))
        );
        assert_eq!(
            parse(" @EVERY 1h ", None).describe(),
            "\"@EVERY 1h\" in UTC"
        );
    }

    #[test]
    fn every_needs_a_whole_number_of_seconds() {
        for (expr, want) in [
            ("@every", "@every needs a duration"),
            ("@every soon", "invalid duration \"soon\""),
            (
                "@every 500ms",
                "\"500ms\" is not a whole number of seconds of at least 1s",
            ),
            (
                "@every 1500ms",
                "\"1500ms\" is not a whole number of seconds",
            ),
            (
                "@every 0s",
                "\"0s\" is not a whole number of seconds of at least 1s",
            ),
        ] {
            let got = parse_err(expr, None);
            assert!(
                got.starts_with(&format!("invalid cron expression {expr:?}: {want}")),
                "{expr}: {got}"
            );
        }
    }

    #[test]
    fn parse_refuses_expressions_that_never_fire() {
        for expr in ["0 0 30 2 *", "0 0 31 4 *"] {
            let got = parse_err(expr, None);
            assert!(got.contains("it never fires"), "{got}");
        }
        // Leap days are rare, not impossible.
        parse("0 0 29 2 *", None);
    }

    #[test]
    fn parse_unknown_time_zone_says_to_use_an_iana_name() {
        let err = Schedule::parse("0 * * * *", Some("Mars/Base")).unwrap_err();
        assert!(
            matches!(&err, ScheduleError::TimeZone { timezone, .. } if timezone == "Mars/Base")
        );
        assert_eq!(
            err.to_string(),
            "unknown time zone \"Mars/Base\"; use an IANA name such as UTC or Europe/Berlin"
        );
        assert_eq!(
            parse_err("0 * * * *", Some("europe/berlin")),
            "unknown time zone \"europe/berlin\"; did you mean \"Europe/Berlin\"? \
             IANA names are case-sensitive"
        );
        // The zone is checked first, so a bad zone is reported even with a bad expression.
        assert!(parse_err("x", Some("Mars/Base")).starts_with("unknown time zone"));
    }

    #[test]
    fn parse_errors_carry_the_expression_and_reason() {
        match Schedule::parse("0 * *", Some("UTC")) {
            Err(ScheduleError::Expression { expr, reason }) => {
                assert_eq!(expr, "0 * *");
                assert_eq!(reason, EXPECTED_FIELDS);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn hourly_utc_next_is_strictly_after_and_an_hour_apart() {
        let s = parse("0 * * * *", None);
        assert_eq!(
            s.next_after(utc(2026, 5, 1, 10, 17, 33)),
            Some(utc(2026, 5, 1, 11, 0, 0))
        );
        // Strictly after: a fire time is not its own successor.
        assert_eq!(
            s.next_after(utc(2026, 5, 1, 11, 0, 0)),
            Some(utc(2026, 5, 1, 12, 0, 0))
        );
        let just_before = utc(2026, 5, 1, 10, 59, 59) + TimeDelta::milliseconds(999);
        assert_eq!(s.next_after(just_before), Some(utc(2026, 5, 1, 11, 0, 0)));
        let just_after = utc(2026, 5, 1, 11, 0, 0) + TimeDelta::milliseconds(1);
        assert_eq!(s.next_after(just_after), Some(utc(2026, 5, 1, 12, 0, 0)));
        assert_eq!(s.interval_at(utc(2026, 5, 1, 10, 17, 33)), Some(hours(1)));
        // Year and month ends.
        assert_eq!(
            s.next_after(utc(2026, 12, 31, 23, 30, 0)),
            Some(utc(2027, 1, 1, 0, 0, 0))
        );
    }

    #[test]
    fn daily_interval_is_a_day() {
        let s = parse("@daily", None);
        assert_eq!(s.interval_at(utc(2026, 3, 29, 12, 0, 0)), Some(hours(24)));
        assert_eq!(
            s.next_after(utc(2026, 3, 29, 12, 0, 0)),
            Some(utc(2026, 3, 30, 0, 0, 0))
        );
    }

    #[test]
    fn every_quarter_hour() {
        let s = parse("*/15 * * * *", None);
        assert_eq!(
            s.next_after(utc(2026, 5, 1, 10, 7, 0)),
            Some(utc(2026, 5, 1, 10, 15, 0))
        );
        assert_eq!(
            s.next_after(utc(2026, 5, 1, 10, 45, 0)),
            Some(utc(2026, 5, 1, 11, 0, 0))
        );
        assert_eq!(s.interval_at(utc(2026, 5, 1, 10, 7, 0)), Some(minutes(15)));
    }

    #[test]
    fn weekly_fires_on_the_weekday_a_week_apart() {
        let s = parse("0 3 * * 1", None); // Mondays 03:00
                                          // 2026-01-01 is a Thursday.
        assert_eq!(
            s.next_after(utc(2026, 1, 1, 0, 0, 0)),
            Some(utc(2026, 1, 5, 3, 0, 0))
        );
        assert_eq!(
            s.next_after(utc(2026, 1, 5, 3, 0, 0)),
            Some(utc(2026, 1, 12, 3, 0, 0))
        );
        assert_eq!(s.interval_at(utc(2026, 1, 1, 0, 0, 0)), Some(hours(7 * 24)));
    }

    #[test]
    fn weekly_in_berlin_across_spring_forward_is_167_hours() {
        // 2026-03-29 is a Sunday, the day Berlin moves from CET to CEST.
        let s = parse("@weekly", Some("Europe/Berlin"));
        let from = utc(2026, 3, 25, 0, 0, 0);
        assert_eq!(s.next_after(from), Some(utc(2026, 3, 28, 23, 0, 0))); // 00:00 CET
        assert_eq!(
            s.next_after(utc(2026, 3, 28, 23, 0, 0)),
            Some(utc(2026, 4, 4, 22, 0, 0)) // 00:00 CEST
        );
        assert_eq!(s.interval_at(from), Some(hours(167)));
    }

    #[test]
    fn berlin_0230_on_spring_forward_day_fires_once_at_0300() {
        // On 2026-03-29 Berlin's clock goes 02:00 CET -> 03:00 CEST: 02:30 does
        // not exist, and croner fires at the first instant after the gap.
        let s = parse("30 2 * * *", Some("Europe/Berlin"));
        let fires = fires_between(&s, utc(2026, 3, 27, 12, 0, 0), utc(2026, 3, 31, 0, 0, 0));
        assert_eq!(
            fires,
            vec![
                utc(2026, 3, 28, 1, 30, 0), // 02:30 CET
                utc(2026, 3, 29, 1, 0, 0),  // 03:00 CEST, right after the gap
                utc(2026, 3, 30, 0, 30, 0), // 02:30 CEST
            ]
        );
        // Both intervals that touch the change are half an hour short:
        // 02:30 CET -> 03:00 CEST -> 02:30 CEST.
        let half_hour = Duration::from_secs(30 * 60);
        assert_eq!(
            s.interval_at(utc(2026, 3, 27, 12, 0, 0)),
            Some(hours(23) + half_hour)
        );
        assert_eq!(
            s.interval_at(utc(2026, 3, 28, 12, 0, 0)),
            Some(hours(23) + half_hour)
        );
        assert_eq!(s.interval_at(utc(2026, 3, 29, 12, 0, 0)), Some(hours(24)));
    }

    #[test]
    fn berlin_0230_on_fall_back_day_fires_exactly_once() {
        // On 2026-10-25 Berlin's clock goes 03:00 CEST -> 02:00 CET: 02:30
        // happens twice (00:30 and 01:30 UTC); only the first one fires.
        let s = parse("30 2 * * *", Some("Europe/Berlin"));
        let fires = fires_between(&s, utc(2026, 10, 23, 12, 0, 0), utc(2026, 10, 27, 0, 0, 0));
        assert_eq!(
            fires,
            vec![
                utc(2026, 10, 24, 0, 30, 0), // 02:30 CEST
                utc(2026, 10, 25, 0, 30, 0), // 02:30 CEST, first pass
                utc(2026, 10, 26, 1, 30, 0), // 02:30 CET
            ]
        );
        // From inside the repeated hour, on either pass, the second 02:30 is not offered.
        assert_eq!(
            s.next_after(utc(2026, 10, 25, 0, 30, 0)),
            Some(utc(2026, 10, 26, 1, 30, 0))
        );
        assert_eq!(
            s.next_after(utc(2026, 10, 25, 1, 15, 0)),
            Some(utc(2026, 10, 26, 1, 30, 0))
        );
        assert_eq!(s.interval_at(utc(2026, 10, 24, 12, 0, 0)), Some(hours(25)));
    }

    #[test]
    fn hourly_across_dst_fires_every_real_hour() {
        let ny = parse("0 * * * *", Some("America/New_York"));
        // Fall back 2026-11-01 02:00 EDT -> 01:00 EST: 01:00 happens twice, both fire.
        let fires = fires_between(&ny, utc(2026, 11, 1, 3, 30, 0), utc(2026, 11, 1, 9, 0, 0));
        assert_eq!(
            fires,
            (4..9)
                .map(|h| utc(2026, 11, 1, h, 0, 0))
                .collect::<Vec<_>>()
        );
        // Spring forward 2026-03-08 02:00 EST -> 03:00 EDT: 02:00 does not exist.
        let fires = fires_between(&ny, utc(2026, 3, 8, 5, 30, 0), utc(2026, 3, 8, 10, 0, 0));
        assert_eq!(
            fires,
            (6..10)
                .map(|h| utc(2026, 3, 8, h, 0, 0))
                .collect::<Vec<_>>()
        );
        let berlin = parse("0 * * * *", Some("Europe/Berlin"));
        for day in [utc(2026, 3, 28, 12, 0, 0), utc(2026, 10, 24, 12, 0, 0)] {
            // From 12:00 (exclusive) for 30 real hours (exclusive): 29 fires.
            let fires = fires_between(&berlin, day, day + TimeDelta::hours(30));
            assert_eq!(fires.len(), 29);
            for pair in fires.windows(2) {
                assert_eq!(pair[1] - pair[0], TimeDelta::hours(1), "{pair:?}");
            }
        }
    }

    #[test]
    fn no_fire_time_near_the_end_of_croners_range() {
        let s = parse("@yearly", None);
        assert_eq!(s.next_after(utc(5000, 1, 1, 0, 0, 0)), None);
        assert_eq!(s.interval_at(utc(5000, 1, 1, 0, 0, 0)), None);
    }

    #[test]
    fn tokio_clock_follows_paused_time() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let clock = TokioClock::starting_at(utc(2026, 5, 1, 9, 30, 0));
            assert_eq!(clock.now(), utc(2026, 5, 1, 9, 30, 0));
            tokio::time::advance(minutes(90)).await;
            assert_eq!(clock.now(), utc(2026, 5, 1, 11, 0, 0));
        });
        let before = Utc::now();
        let now = SystemClock.now();
        assert!(now >= before);
    }

    /// What the scheduler reported, in order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        /// `on_next(t)`.
        Next(DateTime<Utc>),
        /// `fire(scheduled)`, with the clock's time at the call.
        Fire {
            scheduled: DateTime<Utc>,
            at: DateTime<Utc>,
        },
    }

    /// A running scheduler under test, with what it reported.
    struct Harness {
        events: Arc<Mutex<Vec<Event>>>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn start(schedule: Schedule, jitter: Duration, clock: Arc<dyn Clock>) -> Self {
            Self::start_with(schedule, jitter, clock, |_| {})
        }

        fn start_with(
            schedule: Schedule,
            jitter: Duration,
            clock: Arc<dyn Clock>,
            on_fire: impl Fn(DateTime<Utc>) + Send + 'static,
        ) -> Self {
            let events = Arc::new(Mutex::new(Vec::new()));
            let shutdown = CancellationToken::new();
            let (next_log, fire_log) = (events.clone(), events.clone());
            let fire_clock = clock.clone();
            let task = tokio::spawn(
                run_scheduler(
                    schedule,
                    jitter,
                    clock,
                    move |t| next_log.lock().unwrap().push(Event::Next(t)),
                    move |scheduled| {
                        let at = fire_clock.now();
                        fire_log.lock().unwrap().push(Event::Fire { scheduled, at });
                        on_fire(scheduled);
                    },
                    shutdown.clone(),
                )
                .instrument(tracing::info_span!("test_scheduler")),
            );
            Harness {
                events,
                shutdown,
                task,
            }
        }

        fn events(&self) -> Vec<Event> {
            self.events.lock().unwrap().clone()
        }

        /// The (scheduled, fired at) pairs so far.
        fn fires(&self) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
            self.events()
                .into_iter()
                .filter_map(|e| match e {
                    Event::Fire { scheduled, at } => Some((scheduled, at)),
                    Event::Next(_) => None,
                })
                .collect()
        }

        fn scheduled(&self) -> Vec<DateTime<Utc>> {
            self.fires().into_iter().map(|(s, _)| s).collect()
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.expect("scheduler task");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_fires_hourly_at_the_exact_instants_and_reports_next_first() {
        let clock = Arc::new(TokioClock::starting_at(utc(2026, 5, 1, 9, 30, 0)));
        let h = Harness::start(parse("0 * * * *", None), Duration::ZERO, clock);
        tokio::time::sleep(hours(4) + minutes(1)).await;
        let t = |hour| utc(2026, 5, 1, hour, 0, 0);
        assert_eq!(
            h.events(),
            vec![
                Event::Next(t(10)),
                Event::Fire {
                    scheduled: t(10),
                    at: t(10)
                },
                Event::Next(t(11)),
                Event::Fire {
                    scheduled: t(11),
                    at: t(11)
                },
                Event::Next(t(12)),
                Event::Fire {
                    scheduled: t(12),
                    at: t(12)
                },
                Event::Next(t(13)),
                Event::Fire {
                    scheduled: t(13),
                    at: t(13)
                },
                Event::Next(t(14)),
            ]
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_at_hourly_alias_fires_on_the_hour() {
        let clock = Arc::new(TokioClock::starting_at(utc(2026, 5, 1, 23, 10, 0)));
        let h = Harness::start(parse("@hourly", None), Duration::ZERO, clock);
        tokio::time::sleep(hours(2) + minutes(1)).await;
        let fired: Vec<_> = h
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Fire { scheduled, at } => Some((scheduled, at)),
                _ => None,
            })
            .collect();
        let (a, b) = (utc(2026, 5, 2, 0, 0, 0), utc(2026, 5, 2, 1, 0, 0));
        assert_eq!(fired, vec![(a, a), (b, b)]);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_hourly_in_new_york_fires_25_times_on_fall_back_day() {
        // Local 2026-11-01 runs from 04:00 UTC (00:00 EDT) to 05:00 UTC next day
        // (00:00 EST): 25 hours, 01:00 twice.
        let clock = Arc::new(TokioClock::starting_at(utc(2026, 11, 1, 3, 30, 0)));
        let s = parse("0 * * * *", Some("America/New_York"));
        let h = Harness::start(s, Duration::ZERO, clock);
        tokio::time::sleep(hours(26)).await; // until 05:30 UTC on Nov 2
        let fires = h.fires();
        let scheduled: Vec<_> = fires.iter().map(|(s, _)| *s).collect();
        let want: Vec<_> = (0..26)
            .map(|i| utc(2026, 11, 1, 4, 0, 0) + TimeDelta::hours(i))
            .collect();
        assert_eq!(scheduled, want);
        for (s, at) in &fires {
            assert_eq!(s, at, "fired at its instant");
        }
        let on_nov_1 = scheduled
            .iter()
            .filter(|t| {
                t.with_timezone(&chrono_tz::America::New_York).date_naive()
                    == chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()
            })
            .count();
        assert_eq!(on_nov_1, 25);
        for pair in scheduled.windows(2) {
            assert_eq!(pair[1] - pair[0], TimeDelta::hours(1));
        }
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_daily_in_berlin_fires_once_per_day_across_both_dst_changes() {
        let s = parse("30 2 * * *", Some("Europe/Berlin"));
        let clock = Arc::new(TokioClock::starting_at(utc(2026, 3, 27, 12, 0, 0)));
        let h = Harness::start(s.clone(), Duration::ZERO, clock);
        tokio::time::sleep(hours(3 * 24)).await;
        assert_eq!(
            h.scheduled(),
            vec![
                utc(2026, 3, 28, 1, 30, 0),
                utc(2026, 3, 29, 1, 0, 0),
                utc(2026, 3, 30, 0, 30, 0),
            ]
        );
        h.stop().await;

        let clock = Arc::new(TokioClock::starting_at(utc(2026, 10, 23, 12, 0, 0)));
        let h = Harness::start(s, Duration::ZERO, clock);
        tokio::time::sleep(hours(3 * 24)).await;
        assert_eq!(
            h.scheduled(),
            vec![
                utc(2026, 10, 24, 0, 30, 0),
                utc(2026, 10, 25, 0, 30, 0),
                utc(2026, 10, 26, 1, 30, 0),
            ]
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_jitter_delays_within_bounds_and_never_early() {
        let jitter = minutes(10);
        let clock = Arc::new(TokioClock::starting_at(utc(2026, 5, 1, 0, 30, 0)));
        let h = Harness::start(parse("0 * * * *", None), jitter, clock);
        tokio::time::sleep(hours(20) + minutes(15)).await;
        let fires = h.fires();
        assert_eq!(fires.len(), 20);
        let max = TimeDelta::from_std(jitter).unwrap() + TimeDelta::milliseconds(1);
        let mut delays = Vec::new();
        for (i, (scheduled, at)) in fires.iter().enumerate() {
            assert_eq!(
                *scheduled,
                utc(2026, 5, 1, 1, 0, 0) + TimeDelta::hours(i as i64)
            );
            assert!(at >= scheduled, "fired early: {at} < {scheduled}");
            assert!(
                *at - *scheduled <= max,
                "jitter too long: {at} for {scheduled}"
            );
            delays.push(*at - *scheduled);
        }
        // The delay is random, not always zero or always the same.
        delays.sort();
        delays.dedup();
        assert!(delays.len() > 1, "{delays:?}");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_stops_promptly_on_shutdown_without_firing_again() {
        let clock = Arc::new(TokioClock::starting_at(utc(2026, 5, 1, 9, 30, 0)));
        let h = Harness::start(parse("0 * * * *", None), Duration::ZERO, clock);
        tokio::time::sleep(hours(1)).await; // 10:30, one fire at 10:00
        assert_eq!(h.scheduled(), vec![utc(2026, 5, 1, 10, 0, 0)]);
        let events = h.events.clone();
        let before = tokio::time::Instant::now();
        h.shutdown.cancel();
        tokio::time::timeout(Duration::from_millis(1), h.task)
            .await
            .expect("the scheduler returns as soon as it is cancelled")
            .expect("scheduler task");
        assert_eq!(tokio::time::Instant::now(), before, "no time passed");
        tokio::time::sleep(hours(3)).await;
        let fires = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, Event::Fire { .. }))
            .count();
        assert_eq!(fires, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_cancelled_before_start_does_nothing() {
        let clock = Arc::new(TokioClock::starting_at(utc(2026, 5, 1, 9, 59, 0)));
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let calls = Arc::new(Mutex::new(0));
        let (a, b) = (calls.clone(), calls.clone());
        run_scheduler(
            parse("* * * * *", None),
            Duration::ZERO,
            clock,
            move |_| *a.lock().unwrap() += 1,
            move |_| *b.lock().unwrap() += 1,
            shutdown,
        )
        .await;
        assert_eq!(*calls.lock().unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_returns_when_there_is_no_next_fire_time() {
        let clock = Arc::new(TokioClock::starting_at(utc(5000, 1, 1, 0, 0, 0)));
        let fired = Arc::new(Mutex::new(0));
        let f = fired.clone();
        tokio::time::timeout(
            Duration::from_secs(1),
            run_scheduler(
                parse("@yearly", None),
                Duration::ZERO,
                clock,
                |_| panic!("there is no next time to report"),
                move |_| *f.lock().unwrap() += 1,
                CancellationToken::new(),
            ),
        )
        .await
        .expect("the scheduler returns by itself");
        assert_eq!(*fired.lock().unwrap(), 0);
    }

    /// A tokio-driven clock whose wall time can be moved by hand, like an
    /// administrator or NTP stepping the system clock.
    struct JumpClock {
        inner: TokioClock,
        offset: Mutex<TimeDelta>,
    }

    impl JumpClock {
        fn starting_at(t: DateTime<Utc>) -> Arc<Self> {
            Arc::new(JumpClock {
                inner: TokioClock::starting_at(t),
                offset: Mutex::new(TimeDelta::zero()),
            })
        }

        fn jump(&self, by: TimeDelta) {
            *self.offset.lock().unwrap() += by;
        }
    }

    impl Clock for JumpClock {
        fn now(&self) -> DateTime<Utc> {
            self.inner.now() + *self.offset.lock().unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_clock_jumping_back_right_after_a_fire_does_not_fire_it_again() {
        let clock = JumpClock::starting_at(utc(2026, 5, 1, 9, 30, 0));
        let jumper = clock.clone();
        // The clock goes back 45 minutes the moment 10:00 fires: the loop then
        // reads 09:15, when 10:00 is again "the next fire time" by the clock.
        let h = Harness::start_with(
            parse("0 * * * *", None),
            Duration::ZERO,
            clock.clone(),
            move |t| {
                if t == utc(2026, 5, 1, 10, 0, 0) {
                    jumper.jump(TimeDelta::minutes(-45));
                }
            },
        );
        tokio::time::sleep(hours(3)).await; // wall clock 11:45
        assert_eq!(clock.now(), utc(2026, 5, 1, 11, 45, 0));
        assert_eq!(
            h.scheduled(),
            vec![utc(2026, 5, 1, 10, 0, 0), utc(2026, 5, 1, 11, 0, 0)]
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_clock_jumping_back_while_waiting_waits_for_the_wall_clock() {
        let clock = JumpClock::starting_at(utc(2026, 5, 1, 9, 30, 0));
        let h = Harness::start(parse("0 * * * *", None), Duration::ZERO, clock.clone());
        tokio::time::sleep(minutes(40)).await; // 10:10, 10:00 fired
        clock.jump(TimeDelta::minutes(-30)); // 09:40: 10:00 comes round again
        tokio::time::sleep(minutes(90)).await; // wall clock 11:10
        assert_eq!(clock.now(), utc(2026, 5, 1, 11, 10, 0));
        let fires = h.fires();
        assert_eq!(
            fires.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![utc(2026, 5, 1, 10, 0, 0), utc(2026, 5, 1, 11, 0, 0)]
        );
        assert_eq!(
            fires[1].1,
            utc(2026, 5, 1, 11, 0, 0),
            "11:00 by the wall clock"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn scheduler_clock_jumping_forward_past_several_fires_fires_once() {
        let clock = JumpClock::starting_at(utc(2026, 5, 1, 9, 30, 0));
        let h = Harness::start(parse("0 * * * *", None), Duration::ZERO, clock.clone());
        tokio::time::sleep(minutes(10)).await; // 09:40, waiting for 10:00
        clock.jump(TimeDelta::hours(5)); // 14:40: 10:00 to 14:00 passed at once
        tokio::time::sleep(minutes(30)).await; // wall clock 15:10
        let fires = h.fires();
        assert_eq!(
            fires.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![utc(2026, 5, 1, 10, 0, 0), utc(2026, 5, 1, 15, 0, 0)],
            "one fire for the jump, then the schedule goes on"
        );
        // Noticed within one clock re-check.
        let late = fires[0].1 - utc(2026, 5, 1, 14, 40, 0);
        assert!(
            late <= TimeDelta::from_std(CLOCK_RECHECK).unwrap(),
            "{late}"
        );
        h.stop().await;
    }

    #[test]
    fn skipped_fires_are_counted_for_the_log() {
        let s = parse("0 * * * *", None);
        let fired = utc(2026, 5, 1, 10, 0, 0);
        assert_eq!(count_skipped(&s, fired, utc(2026, 5, 1, 10, 0, 5)), 0);
        assert_eq!(count_skipped(&s, fired, utc(2026, 5, 1, 14, 40, 0)), 4);
        let every_minute = parse("* * * * *", None);
        assert_eq!(
            count_skipped(&every_minute, fired, utc(2026, 6, 1, 0, 0, 0)),
            MAX_SKIPPED_COUNT
        );
    }

    #[test]
    fn random_delay_stays_within_jitter() {
        assert_eq!(random_delay(Duration::ZERO), Duration::ZERO);
        for _ in 0..1000 {
            assert!(random_delay(Duration::from_millis(3)) <= Duration::from_millis(3));
        }
    }

    #[test]
    fn scheduler_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let fut = run_scheduler(
            parse("@hourly", None),
            Duration::ZERO,
            Arc::new(SystemClock),
            |_| {},
            |_| {},
            CancellationToken::new(),
        );
        assert_send(&fut);
    }
}
