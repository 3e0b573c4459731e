//! `last_used_at`, coalesced: uses are noted in memory and written in one batched UPDATE
//! every few seconds (and on shutdown), and only when a token's time moved by a minute. The
//! warm Introspect path never writes to the database.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::Result;
use crate::domain::model::{Timestamp, Token};
use crate::domain::ports::Store;

use super::ActiveToken;

/// `last_used_at` is kept to the minute.
const RESOLUTION: chrono::TimeDelta = chrono::TimeDelta::minutes(1);

/// Notes token uses and flushes them in batches.
#[derive(Debug)]
pub struct LastUsed {
    store: Arc<dyn Store>,
    pending: Mutex<HashMap<String, Timestamp>>,
}

impl LastUsed {
    /// A coalescer writing to `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that `token` was used at `now`, and returns the use time now on record (`now`,
    /// or a time less than a minute before it). `noted` is the use time the token's previous
    /// verdict carried (Unix ms), which is newer than the row's while a write is pending: a
    /// token used every second is then written once a minute, however often its verdict is
    /// recomputed. Never waits on I/O.
    pub fn record(&self, token: &Token, now: Timestamp, noted: Option<i64>) -> Timestamp {
        let noted = noted.and_then(chrono::DateTime::from_timestamp_millis);
        let last = noted.max(token.last_used_at);
        // A clock stepped back makes `last` look recent forever; record anew instead.
        if let Some(last) = last
            && (chrono::TimeDelta::zero()..RESOLUTION).contains(&(now - last))
        {
            return last;
        }
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(token.id().to_owned(), now);
        now
    }

    /// [`record`](Self::record) for a remembered verdict: while the use time it carries is
    /// less than a minute old this is one atomic load, so the warm path touches no map.
    pub fn touch(&self, active: &ActiveToken, now: Timestamp) {
        let millis = now.timestamp_millis();
        let since = millis - active.last_noted.load(Ordering::Relaxed);
        if (0..RESOLUTION.num_milliseconds()).contains(&since) {
            return;
        }
        let noted = self.record(&active.token, now, None);
        active
            .last_noted
            .store(noted.timestamp_millis(), Ordering::Relaxed);
    }

    /// Writes every noted use; returns how many tokens were written.
    pub async fn flush(&self) -> Result<usize> {
        let batch: Vec<(String, Timestamp)> = {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            pending.drain().collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        if let Err(err) = self.store.touch_last_used(&batch).await {
            // Put them back for the next round, unless newer uses arrived meanwhile.
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (id, at) in batch {
                pending.entry(id).or_insert(at);
            }
            return Err(err);
        }
        metrics::counter!("tokend_last_used_flushed_total").increment(batch.len() as u64);
        Ok(batch.len())
    }

    /// Flushes every `every` until the returned task is aborted.
    pub fn spawn_flusher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(err) = this.flush().await {
                    tracing::warn!(error = %err, "could not record last use; will retry");
                }
            }
        })
    }
}
