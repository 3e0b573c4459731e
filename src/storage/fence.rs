//! The write fence (PostgreSQL): a write returns only once no replica can still answer from
//! a cache that lacks it.
//!
//! PostgreSQL delivers notifications to every listener in commit order. So after a write
//! commits, the writer NOTIFYs a *fence*; a replica whose listener has delivered the fence
//! has applied every change committed before it, and answers with an *acknowledgement*. The
//! writer returns when every replica that might be serving from its cache has acknowledged,
//! and otherwise when the lease has run out since the commit.
//!
//! Why the lease bounds the wait: a replica trusts its cache only for the lease after the
//! *sending* of its own latest heartbeat that came back through its listener (see
//! `InvalidationSink::renewed`). A heartbeat sent after the write's commit is delivered after
//! the write's notification, so a replica still trusted once the lease since the commit has
//! passed has applied the write.
//!
//! Which replicas "might be serving": those whose heartbeat this replica's listener delivered
//! within the lease before the fence came back. A replica serving later than that on an
//! older heartbeat would have sent it before the commit, so it was delivered here before the
//! fence. That needs our listener to have been up for the whole lease; a younger listener
//! also waits for every replica the `tokend_replicas` table saw recently.
//!
//! Heartbeats, fences and acknowledgements are signed with a key kept in the database
//! (`tokend_feed_key`), readable by tokend's role only: any role may NOTIFY, and a forged
//! acknowledgement would cut a write's wait short. Change notifications are not signed:
//! they only ever evict.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sea_orm::sqlx::{self, postgres::PgPool};

use crate::domain::ports::WriteFence;

/// The channel heartbeats, fences and acknowledgements travel on.
pub(super) const CONTROL: &str = "tokend_control";

/// Signs and checks control messages: a keyed BLAKE3 hash.
#[derive(Clone)]
pub(super) struct Key([u8; 32]);

impl Key {
    /// The database's key, made by the first replica that asks.
    pub(super) async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let fresh: [u8; 32] = rand::random();
        sqlx::query("INSERT INTO tokend_feed_key (id, key) VALUES (1, $1) ON CONFLICT DO NOTHING")
            .bind(hex(&fresh))
            .execute(pool)
            .await?;
        let stored: String = sqlx::query_scalar("SELECT key FROM tokend_feed_key WHERE id = 1")
            .fetch_one(pool)
            .await?;
        Self::from_hex(&stored)
            .ok_or_else(|| sqlx::Error::Protocol("tokend_feed_key holds no 32-byte key".into()))
    }

    fn from_hex(text: &str) -> Option<Self> {
        let mut key = [0u8; 32];
        if text.len() != 64 {
            return None;
        }
        for (byte, pair) in key.iter_mut().zip(text.as_bytes().chunks(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self(key))
    }

    fn tag(&self, body: &str) -> blake3::Hash {
        blake3::keyed_hash(&self.0, body.as_bytes())
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// What a control message says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// "I am alive": `value` is when it was sent, microseconds after the sender started.
    Heartbeat,
    /// "Everyone, say when you have seen this": `value` is the fence's nonce.
    Fence,
    /// "I have applied everything before fence `value`".
    Ack,
}

impl Kind {
    fn letter(self) -> char {
        match self {
            Self::Heartbeat => 'H',
            Self::Fence => 'F',
            Self::Ack => 'A',
        }
    }
}

/// A control message: `"<kind> <replica> <value> <tag>"`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Control<'a> {
    pub kind: Kind,
    pub from: &'a str,
    pub value: u64,
}

impl<'a> Control<'a> {
    pub fn signed(&self, key: &Key) -> String {
        let body = format!("{} {} {}", self.kind.letter(), self.from, self.value);
        let tag = key.tag(&body).to_hex();
        format!("{body} {tag}")
    }

    /// The message in `payload` if its tag is right; `None` for anything forged or garbled.
    pub fn verify(payload: &'a str, key: &Key) -> Option<Self> {
        let (body, tag) = payload.rsplit_once(' ')?;
        // blake3's `Hash` compares in constant time: a tag cannot be guessed byte by byte.
        if blake3::Hash::from_hex(tag).ok()? != key.tag(body) {
            return None;
        }
        let mut fields = body.split(' ');
        let kind = match fields.next()? {
            "H" => Kind::Heartbeat,
            "F" => Kind::Fence,
            "A" => Kind::Ack,
            _ => return None,
        };
        let from = fields.next()?;
        let value = fields.next()?.parse().ok()?;
        fields
            .next()
            .is_none()
            .then_some(Self { kind, from, value })
    }
}

/// This replica's half of the fence: its id, the replicas its listener hears, and the
/// fences its writers are waiting on. Shared by the change feed (which delivers) and the
/// writers (which wait).
#[derive(Debug)]
pub struct Fences {
    pool: PgPool,
    /// This process's replica id (random, for its life).
    me: Box<str>,
    /// The clock heartbeats carry their sending time on.
    born: Instant,
    /// How long a replica trusts its cache after sending a heartbeat that came back.
    lease: Duration,
    key: OnceLock<Key>,
    state: Mutex<State>,
    /// Rung when a fence comes back or is acknowledged.
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    /// When the current listener connection started listening; `None` while there is none.
    listening_since: Option<Instant>,
    /// Other replicas, by id: when their latest heartbeat was delivered here.
    heard: HashMap<Box<str>, Instant>,
    /// Fences this replica's writers are waiting on, by nonce.
    pending: HashMap<u64, Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Set when the fence came back through our own listener: who must acknowledge it.
    expected: Option<Expected>,
    acked: HashSet<Box<str>>,
}

#[derive(Debug)]
struct Expected {
    /// Replicas heard within the lease before the fence came back.
    heard: Vec<Box<str>>,
    /// Whether our listener was younger than the lease then: the replica table counts too.
    young: bool,
}

impl Fences {
    pub(super) fn new(pool: PgPool, lease: Duration) -> Self {
        Self {
            pool,
            me: format!("{:016x}", rand::random::<u64>()).into(),
            born: Instant::now(),
            lease,
            key: OnceLock::new(),
            state: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        }
    }

    pub(super) fn me(&self) -> &str {
        &self.me
    }

    pub(super) fn key(&self) -> Option<&Key> {
        self.key.get()
    }

    pub(super) fn set_key(&self, key: Key) {
        let _ = self.key.set(key);
    }

    /// Microseconds since this replica started: a heartbeat's sending time.
    pub(super) fn clock(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The instant a heartbeat of ours stamped `sent` was sent.
    pub(super) fn sent_at(&self, sent: u64) -> Instant {
        self.born + Duration::from_micros(sent)
    }

    /// A heartbeat from this replica, signed.
    pub(super) fn heartbeat(&self, key: &Key) -> String {
        let message = Control {
            kind: Kind::Heartbeat,
            from: &self.me,
            value: self.clock(),
        };
        message.signed(key)
    }

    pub(super) fn ack(&self, key: &Key, nonce: u64) -> String {
        let message = Control {
            kind: Kind::Ack,
            from: &self.me,
            value: nonce,
        };
        message.signed(key)
    }

    pub(super) fn listening(&self, since: Option<Instant>) {
        self.lock().listening_since = since;
    }

    /// Another replica's heartbeat was delivered.
    pub(super) fn heard(&self, replica: &str) {
        let now = Instant::now();
        let mut state = self.lock();
        // Replicas gone for good are forgotten rather than kept forever.
        let lease = self.lease;
        if state.heard.len() > 64 {
            state
                .heard
                .retain(|_, at| now.duration_since(*at) < lease * 4);
        }
        match state.heard.get_mut(replica) {
            Some(at) => *at = now,
            None => {
                state.heard.insert(replica.into(), now);
            }
        }
    }

    /// One of our own fences came back: every replica heard within the lease must now
    /// acknowledge it.
    pub(super) fn echoed(&self, nonce: u64) {
        let now = Instant::now();
        let mut state = self.lock();
        let young = state
            .listening_since
            .is_none_or(|since| now.duration_since(since) < self.lease);
        let heard = state
            .heard
            .iter()
            .filter(|(_, at)| now.duration_since(**at) < self.lease)
            .map(|(replica, _)| replica.clone())
            .collect();
        if let Some(pending) = state.pending.get_mut(&nonce) {
            pending.expected = Some(Expected { heard, young });
            drop(state);
            self.changed.notify_waiters();
        }
    }

    /// Replica `from` acknowledged fence `nonce`.
    pub(super) fn acked(&self, nonce: u64, from: &str) {
        let mut state = self.lock();
        if let Some(pending) = state.pending.get_mut(&nonce) {
            pending.acked.insert(from.into());
            drop(state);
            self.changed.notify_waiters();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends a fence and waits for every replica that must acknowledge it. `false`: the
    /// round cannot complete (no listener, no key, the database refused the fence).
    async fn round(&self) -> bool {
        let Some(key) = self.key.get() else {
            return false;
        };
        if self.lock().listening_since.is_none() {
            return false;
        }
        let nonce: u64 = rand::random();
        self.lock().pending.insert(nonce, Pending::default());
        let _forget = Forget(self, nonce);
        let fence = Control {
            kind: Kind::Fence,
            from: &self.me,
            value: nonce,
        };
        // The replica table is read in the same statement: after the write's commit, so a
        // replica that registered with a heartbeat sent before the commit is in it.
        let window = (self.lease * 2 + Duration::from_secs(1)).as_secs_f64();
        let sent = sqlx::query_scalar::<_, Vec<String>>(
            "SELECT array(SELECT id FROM tokend_replicas
                          WHERE seen > clock_timestamp() - make_interval(secs => $3))
             FROM (SELECT pg_notify($1, $2)) AS fence",
        )
        .bind(CONTROL)
        .bind(fence.signed(key))
        .bind(window)
        .fetch_one(&self.pool)
        .await;
        let Ok(registered) = sent else {
            return false;
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change in between is not missed.
            changed.as_mut().enable();
            if self.complete(nonce, &registered) {
                return true;
            }
            changed.await;
        }
    }

    fn complete(&self, nonce: u64, registered: &[String]) -> bool {
        let state = self.lock();
        let Some(Pending {
            expected: Some(expected),
            acked,
        }) = state.pending.get(&nonce)
        else {
            return false;
        };
        let waits_for = |replica: &str| replica != &*self.me && !acked.contains(replica);
        let heard_all = !expected.heard.iter().any(|r| waits_for(r));
        let registered_all = !expected.young || !registered.iter().any(|r| waits_for(r.as_str()));
        heard_all && registered_all
    }
}

/// Stops waiting on fence `.1` however the round ends.
struct Forget<'a>(&'a Fences, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.lock().pending.remove(&self.1);
    }
}

#[async_trait]
impl WriteFence for Fences {
    async fn settle(&self, committed: Instant) {
        let deadline = committed + self.lease;
        let round = tokio::time::timeout_at(deadline.into(), self.round()).await;
        if matches!(round, Ok(true)) {
            return;
        }
        // No way to hear from everyone: wait until no replica can still trust a cache that
        // lacks this write.
        metrics::counter!("tokend_change_feed_ack_timeouts_total").increment(1);
        tracing::warn!(
            waited_ms = deadline.saturating_duration_since(committed).as_millis() as u64,
            "change feed: a write waited out the lease without every replica's acknowledgement"
        );
        tokio::time::sleep_until(deadline.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_verify_only_under_their_key() {
        let key = Key([7; 32]);
        let other = Key([8; 32]);
        let ack = Control {
            kind: Kind::Ack,
            from: "00ab",
            value: 42,
        };
        let signed = ack.signed(&key);
        assert_eq!(Control::verify(&signed, &key), Some(ack));
        assert_eq!(Control::verify(&signed, &other), None);
        // Changing any field, or the tag, breaks it.
        let forged = signed.replacen("42", "43", 1);
        assert_eq!(Control::verify(&forged, &key), None);
        let (body, _) = signed.rsplit_once(' ').unwrap();
        assert_eq!(
            Control::verify(&format!("{body} {}", "0".repeat(64)), &key),
            None
        );
        assert_eq!(Control::verify(body, &key), None);
        assert_eq!(Control::verify("", &key), None);
        // An older replica's unsigned heartbeat is not one.
        assert_eq!(Control::verify("00ab 1500 42", &key), None);
    }

    #[test]
    fn keys_round_trip_through_their_stored_text() {
        let key = Key(rand::random());
        let stored = Key::from_hex(&hex(&key.0)).unwrap();
        assert_eq!(stored.0, key.0);
        assert!(Key::from_hex("abc").is_none());
        assert!(Key::from_hex(&"zz".repeat(32)).is_none());
    }
}
