//! Where backup sets are kept, and everything that reads or removes them: the
//! [`destination`] trait with its local-directory and SFTP implementations, zstd
//! [`compressing`] of the snapshot and age [`sealing`] of an upload, the [`catalog`] (the one definition of a complete
//! set), [`verify`] (a set streamed back against its manifest) and [`prune`]
//! (retention applied to a destination). It may import `source`, `config`,
//! `policy`, `encryption`, `error_chain` and the workspace crates; never
//! `backup`, `restore`, `daemon` or the commands.

pub mod catalog;
pub mod compressing;
pub mod destination;
pub mod fanout;
pub mod paged;
pub mod prune;
pub mod sealing;
pub mod verify;
