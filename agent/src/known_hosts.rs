//! Placeholder: known_hosts checking is being written.
