//! `coordination: leader`: whether this master takes a scheduled backup.
//!
//! Every master runs an agent; in leader mode only the one whose etcd member is
//! the raft leader at the moment of a scheduled start backs up. The local
//! member answers that itself (`Maintenance.Status`: its own id in the response
//! header, and the leader it follows), so no agent talks to another and no
//! lock is needed.
//!
//! What this does not guarantee: each agent asks at its own moment (the
//! schedule's jitter makes those moments seconds or minutes apart), so a
//! leadership change between two agents' checks can give a tick two sets (the
//! old leader asked before the change, the new one after) or none (the new
//! leader asked before it won, the old one after it lost). The cluster-level
//! age alert is what catches a run of missed ticks.
//!
//! When the check itself fails (the local member does not answer within
//! `etcd.dial_timeout`), the agent backs up anyway: that run then fails at its
//! `connect` stage and is counted and alerted on like any failed run, instead
//! of the node falling silent. A member that knows no leader (an election in
//! progress, or cut off from the majority) skips like a follower: during an
//! election every member says so, and backing up then would give the tick a
//! set from each of them; the new leader takes the next tick.

use crate::config::EtcdConfig;
use crate::source::etcd::{EtcdMember, MemberInfo, SnapshotSource};

/// What the local member said about leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// The local member is the leader: back up.
    Leader {
        /// The local member's id.
        member_id: u64,
    },
    /// Another member leads: skip.
    Follower {
        /// The local member's id.
        member_id: u64,
        /// The leader's id, as the local member sees it.
        leader: u64,
    },
    /// The local member knows no leader (an election, or cut off from the
    /// majority): skip, like a follower.
    NoLeader {
        /// The local member's id.
        member_id: u64,
    },
    /// The local member could not be asked: back up, so the run's `connect`
    /// stage records the failure.
    Unknown {
        /// Why, for the log.
        error: String,
    },
}

impl Leadership {
    /// What a status answer means.
    pub fn from_status(info: &MemberInfo) -> Self {
        match info.leader {
            0 => Leadership::NoLeader {
                member_id: info.member_id,
            },
            leader if leader == info.member_id => Leadership::Leader {
                member_id: info.member_id,
            },
            leader => Leadership::Follower {
                member_id: info.member_id,
                leader,
            },
        }
    }

    /// Whether this node takes the scheduled backup.
    pub fn backs_up(&self) -> bool {
        matches!(self, Leadership::Leader { .. } | Leadership::Unknown { .. })
    }
}

/// Asks the local member (`etcd.endpoints[0]`) whether it is the leader. The
/// whole check, connecting included, is bounded by `etcd.dial_timeout`.
pub async fn check(config: &EtcdConfig) -> Leadership {
    let ask = async {
        let mut member = EtcdMember::connect(config).await?;
        member.member_info().await
    };
    match tokio::time::timeout(config.dial_timeout, ask).await {
        Ok(Ok(info)) => Leadership::from_status(&info),
        Ok(Err(e)) => Leadership::Unknown {
            error: e.to_string(),
        },
        Err(_) => Leadership::Unknown {
            error: format!(
                "etcd at {} did not answer within {:?} (etcd.dial_timeout)",
                config.endpoints[0].as_str().trim_end_matches('/'),
                config.dial_timeout
            ),
        },
    }
}

/// An etcd member id as etcd's tools and the manifest write it.
pub fn member_hex(id: u64) -> String {
    format!("{id:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(member_id: u64, leader: u64) -> MemberInfo {
        MemberInfo {
            endpoint: "http://127.0.0.1:2379".into(),
            cluster_id: 1,
            member_id,
            version: "3.5.0".into(),
            revision: 1,
            db_size: 0,
            leader,
        }
    }

    #[test]
    fn the_leader_backs_up_and_so_does_a_node_that_cannot_ask() {
        let leader = Leadership::from_status(&status(7, 7));
        assert_eq!(leader, Leadership::Leader { member_id: 7 });
        assert!(leader.backs_up());
        let follower = Leadership::from_status(&status(7, 9));
        assert_eq!(
            follower,
            Leadership::Follower {
                member_id: 7,
                leader: 9
            }
        );
        assert!(!follower.backs_up());
        let no_leader = Leadership::from_status(&status(7, 0));
        assert_eq!(no_leader, Leadership::NoLeader { member_id: 7 });
        assert!(!no_leader.backs_up());
        assert!(Leadership::Unknown {
            error: "refused".into()
        }
        .backs_up());
    }

    #[tokio::test]
    async fn an_unreachable_member_is_unknown_within_the_dial_timeout() {
        // A listener that accepts and never answers: the check must give up
        // after etcd.dial_timeout, not hang.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let config = EtcdConfig {
            endpoints: vec![format!("http://{addr}").parse().unwrap()],
            tls: None,
            dial_timeout: std::time::Duration::from_millis(300),
            stall_timeout: std::time::Duration::from_secs(60),
        };
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), check(&config))
            .await
            .expect("the check is bounded by the dial timeout");
        assert!(
            matches!(&got, Leadership::Unknown { error } if error.contains("dial_timeout")),
            "{got:?}"
        );
        assert!(got.backs_up());
        assert_eq!(member_hex(0x2a), "000000000000002a");
        drop(silent);
    }
}
