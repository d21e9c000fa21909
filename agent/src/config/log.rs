//! `log:` validated: level filter and format.

use super::*;

impl Validator {
    pub(super) fn log(&mut self, raw: RawLog) -> LogConfig {
        let format = match raw.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.error(
                    "log.format",
                    format!("unknown format {other:?}; expected text or json"),
                );
                LogFormat::Text
            }
        };
        let level = raw.level.unwrap_or_else(|| defaults::LOG_LEVEL.to_string());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
            self.error(
                "log.level",
                format!("invalid filter {level:?}: {e}; use e.g. info or debug"),
            );
        }
        LogConfig { level, format }
    }
}
