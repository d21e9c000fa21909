//! Decisions without I/O that the config parses into and the daemon and the
//! store act on: the [`schedule`] (cron in a time zone, jitter, when to fire)
//! and [`retention`] (which sets to keep, which leftovers to remove). Nothing
//! here imports anything else of the agent.

pub mod retention;
pub mod schedule;
