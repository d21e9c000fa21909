//! The one-line form of an error and its causes, for messages a person reads.
//! Neutral ground: it imports nothing of the agent, so any module may use it.

/// The error and all its causes on one line, with duplicates removed
/// (transport errors often repeat their cause in their own message).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_drops_repeated_causes() {
        let inner =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let outer = std::io::Error::other(inner);
        assert_eq!(chain(&outer), "connection refused");
    }
}
