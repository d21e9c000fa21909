//! `http:` and the daemon settings validated: listeners, token, schedules, jitter, run-on-start, coordination.

use super::*;

impl Validator {
    pub(super) fn daemon(
        &mut self,
        schedule: Option<String>,
        timezone: Option<String>,
        jitter: Option<String>,
        run_on_start: Option<String>,
        http: RawHttp,
        shutdown_grace: Option<String>,
    ) -> DaemonConfig {
        let (schedule, jitter) = self.schedule_and_jitter(schedule, timezone, jitter);
        let run_on_start = self.run_on_start(run_on_start);
        let (listen, metrics_listen) = self.listeners(&http);
        let trigger_min_interval = self.token_and_trigger_interval(&http);
        let shutdown_grace =
            self.duration("shutdown_grace", shutdown_grace, defaults::SHUTDOWN_GRACE);
        DaemonConfig {
            schedule,
            jitter,
            run_on_start,
            coordination: Coordination::PerNode,
            listen,
            token_file: http.token_file,
            metrics_listen,
            trigger_min_interval,
            shutdown_grace,
            drill_schedule: None,
            skip_unchanged: defaults::SKIP_UNCHANGED,
        }
    }

    /// `schedule`, `timezone` and `jitter`: the cron in its zone, and a jitter
    /// shorter than the schedule's interval.
    fn schedule_and_jitter(
        &mut self,
        schedule: Option<String>,
        timezone: Option<String>,
        jitter: Option<String>,
    ) -> (Option<crate::policy::schedule::Schedule>, Duration) {
        if let Some(tz) = &timezone {
            if schedule.is_none() {
                self.error("timezone", format!("{tz:?} is set but schedule is not"));
            }
        }
        let schedule = schedule.and_then(|expr| {
            match crate::policy::schedule::Schedule::parse(&expr, timezone.as_deref()) {
                Ok(s) => Some(s),
                Err(e) => {
                    let field =
                        if matches!(e, crate::policy::schedule::ScheduleError::TimeZone { .. }) {
                            "timezone"
                        } else {
                            "schedule"
                        };
                    self.error(field, e.to_string());
                    None
                }
            }
        });
        let jitter = match jitter {
            Some(text) if humantime::parse_duration(text.trim()).is_ok_and(|d| d.is_zero()) => {
                Duration::ZERO
            }
            other => self.duration("jitter", other, Duration::ZERO),
        };
        if let (Some(s), false) = (&schedule, jitter.is_zero()) {
            if let Some(interval) = s.interval_at(chrono::Utc::now()) {
                if jitter >= interval {
                    self.error(
                        "jitter",
                        format!("{jitter:?} is not shorter than the schedule's interval ({interval:?}); runs would pile up"),
                    );
                }
            }
        }
        (schedule, jitter)
    }

    /// `run_on_start`: when_stale (the default), always or never.
    fn run_on_start(&mut self, raw: Option<String>) -> RunOnStart {
        let run_on_start = raw;
        match run_on_start.as_deref() {
            None | Some("when_stale") => RunOnStart::WhenStale,
            Some("always") => RunOnStart::Always,
            Some("never") => RunOnStart::Never,
            Some(other) => {
                self.error(
                    "run_on_start",
                    format!("unknown value {other:?}; expected when_stale, always or never"),
                );
                RunOnStart::WhenStale
            }
        }
    }

    /// `http.listen` (loopback unless a token or the explicit opt-out) and
    /// `http.metrics_listen` (another port).
    fn listeners(
        &mut self,
        http: &RawHttp,
    ) -> (std::net::SocketAddr, Option<std::net::SocketAddr>) {
        let (listen, metrics_listen) = (http.listen.clone(), http.metrics_listen.clone());
        let listen_text = listen.unwrap_or_else(|| defaults::HTTP_LISTEN.to_string());
        let listen_addr = match listen_text.parse::<std::net::SocketAddr>() {
            Ok(a) => {
                let unauthenticated = http.token_file.is_none()
                    && !http.allow_unauthenticated_remote.unwrap_or(false);
                if !a.ip().is_loopback() && unauthenticated {
                    self.error(
                        "http.listen",
                        format!(
                            "{a} is not a loopback address and http.token_file is not set, so anyone who reaches the port could start backups (each one a full etcd snapshot); set http.token_file to a file holding a bearer token, listen on 127.0.0.1, or, if a network policy already limits who reaches it, set http.allow_unauthenticated_remote: true"
                        ),
                    );
                }
                a
            }
            Err(_) => {
                self.error(
                    "http.listen",
                    format!("{listen_text:?} is not an address:port such as 127.0.0.1:10290"),
                );
                defaults::HTTP_LISTEN
                    .parse()
                    .expect("default listen address parses")
            }
        };
        let metrics_listen =
            metrics_listen.and_then(|text| match text.parse::<std::net::SocketAddr>() {
                Ok(a) if a == listen_addr => {
                    self.error(
                        "http.metrics_listen",
                        format!("{text:?} is http.listen itself; give another port"),
                    );
                    None
                }
                Ok(a) => Some(a),
                Err(_) => {
                    self.error(
                        "http.metrics_listen",
                        format!("{text:?} is not an address:port such as 0.0.0.0:10291"),
                    );
                    None
                }
            });
        (listen_addr, metrics_listen)
    }

    /// `http.token_file` (readable, not empty) and `http.trigger_min_interval`.
    fn token_and_trigger_interval(&mut self, http: &RawHttp) -> Duration {
        if let Some(p) = &http.token_file {
            self.readable_file("http.token_file", p);
            if let Ok(t) = std::fs::read_to_string(p) {
                if t.trim().is_empty() {
                    self.error(
                        "http.token_file",
                        format!("{} is empty; put the bearer token in it", p.display()),
                    );
                }
            }
        }
        match &http.trigger_min_interval {
            Some(text) if humantime::parse_duration(text.trim()).is_ok_and(|d| d.is_zero()) => {
                Duration::ZERO
            }
            other => self.duration(
                "http.trigger_min_interval",
                other.clone(),
                defaults::TRIGGER_MIN_INTERVAL,
            ),
        }
    }

    pub(super) fn coordination(&mut self, raw: Option<String>) -> Coordination {
        match raw.as_deref() {
            None | Some("per_node") => Coordination::PerNode,
            Some("leader") => Coordination::Leader,
            Some(other) => {
                self.error(
                    "coordination",
                    format!("unknown value {other:?}; expected per_node or leader"),
                );
                Coordination::PerNode
            }
        }
    }
}
