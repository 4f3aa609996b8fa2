//! The room's own work between calls: re-reading the policy folder when
//! it changes, deleting what retention and expiry no longer allow,
//! scrubbing stored versions, and matching agreements as their versions
//! change.

use std::path::Path;
use std::time::Duration;

use super::Room;
use super::matching::{match_agreement, save_tables};
use super::upkeep::Scrub;

/// How often the background work runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Every {
    /// Retention and expiry deletion.
    pub(crate) maintenance: Duration,
    /// The check of the policy folder for edits.
    pub(crate) policy_poll: Duration,
    /// The scrub of stored versions, and its pace.
    pub(crate) scrub: Scrub,
}

/// The server's own work between calls: re-reading the policy folder when
/// it changes, and deleting data retention and expiry no longer allow.
pub(crate) fn spawn_background(room: &Room, every: &Every, policies_dir: &Path) -> Background {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let maintenance = {
        let state = room.clone();
        let every = every.maintenance;
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            loop {
                // Run to the end even when asked to stop: the blocking work
                // holds the store, which must be free once `serve` returns.
                let s = state.clone();
                match tokio::task::spawn_blocking(move || s.run_maintenance()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "retention and expiry"),
                    Err(e) => tracing::error!(error = %e, "retention and expiry"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => break,
                }
            }
        })
    };
    let matcher = spawn_matcher(room, stop.subscribe());
    let scrub = {
        let state = room.clone();
        let Scrub {
            every,
            bytes_per_second,
        } = every.scrub;
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            loop {
                let (s, flag) = (state.clone(), stopped.clone());
                let pass = tokio::task::spawn_blocking(move || {
                    s.run_scrub(bytes_per_second, &|| *flag.borrow())
                })
                .await;
                match pass {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => {
                        tracing::error!(versions = n, "scrub found damaged dataset versions")
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "scrub"),
                    Err(e) => tracing::error!(error = %e, "scrub"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => break,
                }
            }
        })
    };
    let state = room.clone();
    let dir = policies_dir.to_path_buf();
    let poll = every.policy_poll;
    let mut stopped = stopped;
    let reload = tokio::spawn(async move {
        let mut last = crate::agreements::reload::folder_digest(&dir);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = stopped.changed() => break,
            }
            let digest = crate::agreements::reload::folder_digest(&dir);
            if digest != last {
                last = digest;
                let (s, d) = (state.clone(), dir.clone());
                if let Err(e) = tokio::task::spawn_blocking(move || s.reload_policies(&d)).await {
                    tracing::error!(error = %e, "re-reading the policy folder");
                }
            }
        }
    });
    Background {
        stop,
        tasks: vec![maintenance, reload, matcher, scrub],
    }
}

/// How long the background matcher lets running queries go first before
/// it stores the tables it matched.
const STORE_TABLES_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Matches agreements' current versions in the background as they are
/// committed, so that an overlap request finds its count recorded. Each run
/// finishes before the task stops: the store must be free once `serve`
/// returns.
fn spawn_matcher(
    room: &Room,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    *room.match_queue.lock() = Some(tx);
    let state = room.clone();
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                got = rx.recv() => match got {
                    Some(a) => a,
                    None => break,
                },
                _ = stopped.changed() => break,
            };
            let mut agreements = std::collections::BTreeSet::from([first]);
            while let Ok(more) = rx.try_recv() {
                agreements.insert(more);
            }
            for agreement in agreements {
                let s = state.clone();
                let run = tokio::task::spawn_blocking(move || match_agreement(&s, &agreement));
                let loaded = match run.await {
                    Ok(loaded) => loaded,
                    Err(e) => {
                        tracing::error!(error = %e, "background matching");
                        None
                    }
                };
                let Some((policy, loaded)) = loaded else {
                    continue;
                };
                queries_first(&state, &stopped).await;
                let s = state.clone();
                let run = tokio::task::spawn_blocking(move || save_tables(&s, &policy, &loaded));
                match run.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "storing matched tables failed; the next start matches again")
                    }
                    Err(e) => tracing::error!(error = %e, "storing matched tables"),
                }
            }
        }
    })
}

/// Waits, before the matcher stores tables, until no query runs: storing
/// only spares the next start a matching, while a query waiting now (the
/// first after a commit) should have the cores. At most
/// [`STORE_TABLES_WAIT`], and not once the server stops.
async fn queries_first(state: &Room, stopped: &tokio::sync::watch::Receiver<bool>) {
    let waited = tokio::time::Instant::now();
    while !state.query_gate().idle() && waited.elapsed() < STORE_TABLES_WAIT && !*stopped.borrow() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Background tasks, stopped with the server.
#[derive(Debug)]
pub(crate) struct Background {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    /// Stops the tasks between two runs and waits until they are gone, so
    /// nothing holds the data directory once `serve` returns. (Aborting
    /// would not do: a blocking run goes on after its task is aborted.)
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
