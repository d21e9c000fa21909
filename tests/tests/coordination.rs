//! `coordination: leader` end to end: a real 3-member etcd cluster on
//! loopback, three real agent daemons (one per member, each with its own node
//! name) writing to one shared destination, a schedule that fires every few
//! seconds. Each tick is backed up once, by the leader's agent; when the
//! leader's member dies, the new leader's agent takes over.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use etcd_backup_proto::Manifest;
use etcd_backup_tests::agent::{AgentConfig, AgentDaemon};
use etcd_backup_tests::etcd::{EtcdCluster, MemberStatus};
use etcd_backup_tests::{complete_sets, metric, wait_for, wait_for_async};

/// Seconds between ticks (`@every 4s`): whole multiples of it since the epoch.
const TICK: i64 = 4;
const DEADLINE: Duration = Duration::from_secs(60);

/// One complete set on the destination.
#[derive(Debug, Clone)]
struct Set {
    node: String,
    member_id: String,
    /// The scheduled instant the run belongs to: its start, rounded down to a tick.
    tick: i64,
    finished_at: DateTime<Utc>,
}

fn sets(dest: &Path) -> Vec<Set> {
    complete_sets(dest)
        .into_iter()
        .map(|dir| {
            let m: Manifest = serde_json::from_slice(
                &std::fs::read(dest.join(&dir).join("manifest.json")).unwrap(),
            )
            .unwrap();
            let started = m.timestamp.as_datetime().timestamp();
            Set {
                node: m.node,
                member_id: m.etcd.member_id,
                tick: started - started.rem_euclid(TICK),
                finished_at: m.finished_at,
            }
        })
        .collect()
}

/// Sets by tick; panics naming the tick when one was backed up twice.
fn by_tick(sets: &[Set]) -> BTreeMap<i64, Set> {
    let mut out = BTreeMap::new();
    for s in sets {
        if let Some(other) = out.insert(s.tick, s.clone()) {
            panic!("tick {} was backed up twice: {other:?} and {s:?}", s.tick);
        }
    }
    out
}

async fn metrics(agent: &AgentDaemon) -> String {
    reqwest::get(agent.url("/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("GET /metrics")
        .text()
        .await
        .unwrap()
}

/// The `node` of every cluster-last-success series, with its value.
fn cluster_series(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("etcd_backup_cluster_last_success_timestamp_seconds{node=\"")
        })
        .map(|rest| {
            let (node, value) = rest.split_once("\"} ").unwrap();
            (node.to_string(), value.parse().unwrap())
        })
        .collect()
}

const NOT_LEADER: &str = "etcd_backup_skipped_total{reason=\"not_leader\"}";
const SCHEDULED_OK: &str = "etcd_backup_runs_total{trigger=\"schedule\",result=\"success\"}";

/// The member every live member names as leader, once they agree.
fn agreed_leader(cluster: &EtcdCluster, live: &[usize]) -> Option<(usize, MemberStatus)> {
    let statuses: Vec<MemberStatus> = live
        .iter()
        .map(|&i| cluster.status(i))
        .collect::<Option<_>>()?;
    let leader = statuses[0].leader;
    if leader == 0 || statuses.iter().any(|s| s.leader != leader) {
        return None;
    }
    let i = live
        .iter()
        .zip(&statuses)
        .find(|(_, s)| s.member_id == leader)
        .map(|(&i, _)| i)?;
    Some((i, statuses[live.iter().position(|&j| j == i)?]))
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leaders_agent_backs_up_each_tick_and_the_new_leader_takes_over() {
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("backups");
    let mut cluster = EtcdCluster::start(EtcdCluster::plan(3, &work.path().join("etcd")));
    let member_ids: Vec<String> = (0..3)
        .map(|i| format!("{:016x}", cluster.status(i).unwrap().member_id))
        .collect();
    let (leader0, before) = wait_for("a leader", DEADLINE, || agreed_leader(&cluster, &[0, 1, 2]));

    let mut agents: Vec<AgentDaemon> = (0..3)
        .map(|i| {
            let mut cfg = AgentConfig::for_endpoint(&cluster.members[i].client_url(), None, &dest);
            cfg.node_name = format!("master-{i}");
            cfg.dial_timeout = "2s".into();
            cfg.extra = format!(
                // Every tick stores a set, etcd written or not: the ticks are what is counted.
                "schedule: \"@every {TICK}s\"\nrun_on_start: never\ncoordination: leader\nskip_unchanged: false\n"
            );
            AgentDaemon::start_on_free_port(&cfg)
        })
        .collect();
    let logs = |agents: &[AgentDaemon]| {
        agents
            .iter()
            .enumerate()
            .map(|(i, a)| format!("--- agent master-{i}:\n{}", a.logs()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader0).collect();

    // Phase 1: a stable leader. Three ticks backed up, then check who took them.
    let start = Instant::now();
    while by_tick(&sets(&dest)).len() < 3 {
        assert!(
            start.elapsed() < DEADLINE,
            "three ticks were not backed up in time\n{}",
            logs(&agents)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut not_leader_early = [0.0; 3];
    for &f in &followers {
        not_leader_early[f] = metric(&metrics(&agents[f]).await, NOT_LEADER);
    }
    let phase1 = by_tick(&sets(&dest));
    let after = cluster.status(leader0).unwrap();
    assert_eq!(
        (after.leader, after.raft_term),
        (before.leader, before.raft_term),
        "an election happened during phase 1; the test's premise (a stable leader) does not hold"
    );
    let ticks: Vec<i64> = phase1.keys().copied().collect();
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], TICK, "a tick was missed: {phase1:?}");
    }
    for s in phase1.values() {
        assert_eq!(
            s.node,
            format!("master-{leader0}"),
            "{phase1:?}\n{}",
            logs(&agents)
        );
        assert_eq!(s.member_id, member_ids[leader0]);
    }
    // The followers keep skipping, and count it; the leader never does.
    wait_for_async("the followers to skip another tick", DEADLINE, || async {
        for &f in &followers {
            if metric(&metrics(&agents[f]).await, NOT_LEADER) <= not_leader_early[f] {
                return None;
            }
        }
        Some(())
    })
    .await;
    for &f in &followers {
        assert!(
            not_leader_early[f] >= 1.0,
            "follower master-{f} did not skip at first"
        );
        let text = metrics(&agents[f]).await;
        assert_eq!(
            metric(&text, SCHEDULED_OK),
            0.0,
            "follower master-{f} backed up"
        );
    }
    let text = metrics(&agents[leader0]).await;
    assert_eq!(metric(&text, NOT_LEADER), 0.0);
    assert!(metric(&text, SCHEDULED_OK) >= 3.0);

    // A follower's cluster metric names the leader's node, in one series.
    let follower = followers[0];
    let series = wait_for_async("the follower to see the leader's set", DEADLINE, || async {
        let series = cluster_series(&metrics(&agents[follower]).await);
        (series.first()?.0 == format!("master-{leader0}")).then_some(series)
    })
    .await;
    assert_eq!(series.len(), 1, "{series:?}");

    // Phase 2: the leader's member dies; another is elected and its agent takes over.
    cluster.kill(leader0);
    let killed_at = Utc::now();
    let (leader1, _) = wait_for("a new leader", DEADLINE, || {
        agreed_leader(&cluster, &followers)
    });
    let elected_at = Utc::now();
    assert_ne!(leader1, leader0);
    let taken_over = |sets: &[Set]| {
        sets.iter()
            .filter(|s| s.node == format!("master-{leader1}") && s.tick > elected_at.timestamp())
            .count()
    };
    let start = Instant::now();
    while taken_over(&sets(&dest)) < 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "the new leader's agent did not back up two ticks\n{}",
            logs(&agents)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let other = *followers.iter().find(|&&i| i != leader1).unwrap();
    let series = wait_for_async(
        "the remaining follower to see the new leader's set",
        DEADLINE,
        || async {
            let series = cluster_series(&metrics(&agents[other]).await);
            (series.first()?.0 == format!("master-{leader1}")).then_some(series)
        },
    )
    .await;
    assert_eq!(
        series.len(),
        1,
        "the old leader's series was not removed: {series:?}"
    );
    // Its value is the finish time of one of the new leader's sets.
    let finished: Vec<f64> = sets(&dest)
        .iter()
        .filter(|s| s.node == format!("master-{leader1}"))
        .map(|s| s.finished_at.timestamp_millis() as f64 / 1000.0)
        .collect();
    assert!(
        finished.contains(&series[0].1),
        "{series:?} not in {finished:?}"
    );
    // The old leader's agent cannot ask its dead member: it went ahead and
    // the run failed at connect, counted, not skipped.
    let text = metrics(&agents[leader0]).await;
    assert!(
        metric(
            &text,
            "etcd_backup_failures_total{stage=\"connect\",destination=\"default\"}"
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(metric(&text, NOT_LEADER), 0.0);

    // Freeze the destination, then judge every tick.
    for a in &mut agents {
        a.kill();
    }
    let all = sets(&dest);
    let ticks = by_tick(&all);
    for s in ticks.values() {
        if s.node == format!("master-{leader0}") {
            // Only runs that started before its member died.
            assert!(s.tick <= killed_at.timestamp(), "{s:?}");
        } else if s.finished_at < killed_at {
            panic!("a follower backed up while the leader was alive: {s:?}");
        }
        if s.tick > elected_at.timestamp() {
            assert_eq!(s.node, format!("master-{leader1}"), "{s:?}");
        }
        let i: usize = s.node.strip_prefix("master-").unwrap().parse().unwrap();
        assert_eq!(s.member_id, member_ids[i], "{s:?}");
    }
}
