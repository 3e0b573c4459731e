//! The write fence (PostgreSQL): a write returns only once no replica can still answer from
//! a cache that lacks it.
//!
//! PostgreSQL delivers notifications to every listener in commit order. So after a write
//! commits, the writer NOTIFYs a *fence*; a replica whose listener has delivered the fence
//! has applied every change committed before it, and answers with an *acknowledgement*. The
//! writer returns when every replica that might be serving from its cache has acknowledged,
//! and otherwise when the longest lease heard has run out since the commit.
//!
//! Why the lease bounds the wait: a replica trusts its cache only for its lease after the
//! *sending* of its own latest heartbeat that came back through its listener (see
//! `InvalidationSink::renewed`). A heartbeat sent after the write's commit is delivered after
//! the write's notification, so a replica still trusted once its lease since the commit has
//! passed has applied the write. Heartbeats carry their sender's lease, as replicas may be
//! configured differently.
//!
//! Which replicas "might be serving": those whose heartbeat this replica's listener delivered
//! within their lease before the fence came back. A replica serving later than that on an
//! older heartbeat would have sent it before the commit, so it was delivered here before the
//! fence. That needs our listener to have been up for the whole lease; a younger listener
//! also waits for every replica the `tokend_replicas` table saw recently. A replica of an
//! older version, which never acknowledges, makes every round wait out the lease.
//!
//! Heartbeats, fences and acknowledgements are signed with a key kept in the database
//! (`tokend_feed_key`), readable by tokend's role only: any role may NOTIFY, and a forged
//! acknowledgement would cut a write's wait short. A heartbeat no later than the last one
//! from its sender is a replay, and ignored. Change notifications are not signed: they only
//! ever evict.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sea_orm::sqlx::{self, postgres::PgPool};

use crate::domain::ports::WriteFence;

/// The channel heartbeats, fences and acknowledgements travel on.
pub(super) const CONTROL: &str = "tokend_control";

/// The channel older versions sent their unsigned heartbeats on.
pub(super) const LEGACY_HEARTBEAT: &str = "tokend_heartbeat";

/// How long another replica's last heartbeat is remembered.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Signs and checks control messages: a keyed BLAKE3 hash.
#[derive(Clone)]
pub(super) struct Key([u8; 32]);

impl Key {
    /// The database's key, made by the first replica that asks.
    pub(super) async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let fresh = blake3::Hash::from_bytes(rand::random());
        sqlx::query("INSERT INTO tokend_feed_key (id, key) VALUES (1, $1) ON CONFLICT DO NOTHING")
            .bind(fresh.to_hex().as_str())
            .execute(pool)
            .await?;
        let stored: String = sqlx::query_scalar("SELECT key FROM tokend_feed_key WHERE id = 1")
            .fetch_one(pool)
            .await?;
        Self::from_hex(&stored)
            .ok_or_else(|| sqlx::Error::Protocol("tokend_feed_key holds no 32-byte key".into()))
    }

    /// The key stored as 64 hex digits (blake3's own hex codec: the key is 32 bytes, as a
    /// digest is).
    fn from_hex(text: &str) -> Option<Self> {
        blake3::Hash::from_hex(text)
            .ok()
            .map(|key| Self(*key.as_bytes()))
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

/// A control message: `"<kind> <replica> <value> <lease> <tag>"`. Every message carries its
/// sender's lease (milliseconds): replicas may be configured differently, and a writer must
/// wait out the longest.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Control<'a> {
    pub kind: Kind,
    pub from: &'a str,
    pub value: u64,
    pub lease_ms: u64,
}

impl<'a> Control<'a> {
    pub fn signed(&self, key: &Key) -> String {
        let body = format!(
            "{} {} {} {}",
            self.kind.letter(),
            self.from,
            self.value,
            self.lease_ms
        );
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
        let lease_ms = fields.next()?.parse().ok()?;
        fields.next().is_none().then_some(Self {
            kind,
            from,
            value,
            lease_ms,
        })
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
    /// The sending time of the latest own heartbeat that came back, over all listeners.
    own_sent: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
    /// Rung when a fence comes back or is acknowledged.
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    /// When the current listener connection started listening; `None` while there is none.
    listening_since: Option<Instant>,
    /// Other replicas, by id.
    heard: HashMap<Box<str>, Heard>,
    /// When a replica of an older version (unsigned heartbeats on the old channel, no
    /// acknowledgements) was last heard: while one may be serving, no round completes.
    legacy: Option<Instant>,
    /// Fences this replica's writers are waiting on, by nonce.
    pending: HashMap<u64, Pending>,
}

/// Another replica, as its heartbeats told us.
#[derive(Debug, Clone, Copy)]
struct Heard {
    /// When its latest heartbeat was delivered here.
    at: Instant,
    /// That heartbeat's sending time on the replica's clock: a heartbeat not later than
    /// the last is a replay, and ignored.
    sent: u64,
    lease: Duration,
}

#[derive(Debug, Default)]
struct Pending {
    /// Set when the fence came back through our own listener: who must acknowledge it.
    expected: Option<Expected>,
    acked: HashSet<Box<str>>,
}

#[derive(Debug)]
struct Expected {
    /// Replicas heard within their lease before the fence came back.
    heard: Vec<Box<str>>,
    /// How long our listener had been listening then (`None`: not at all). Younger than a
    /// lease, it may have missed heartbeats: the replica table counts too.
    listened: Option<Duration>,
    /// The longest lease heard then.
    longest: Duration,
    /// Whether a replica that cannot acknowledge was heard within the lease.
    legacy: bool,
}

impl Fences {
    pub(super) fn new(pool: PgPool, lease: Duration) -> Self {
        Self {
            pool,
            me: format!("{:016x}", rand::random::<u64>()).into(),
            born: Instant::now(),
            lease,
            key: OnceLock::new(),
            own_sent: std::sync::atomic::AtomicU64::new(0),
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
            lease_ms: self.lease_ms(),
        };
        message.signed(key)
    }

    pub(super) fn ack(&self, key: &Key, nonce: u64) -> String {
        let message = Control {
            kind: Kind::Ack,
            from: &self.me,
            value: nonce,
            lease_ms: self.lease_ms(),
        };
        message.signed(key)
    }

    pub(super) fn listening(&self, since: Option<Instant>) {
        self.lock().listening_since = since;
    }

    /// One of our own heartbeats, stamped `sent`, came back; `false` if it is not later than
    /// the last one that did (a replay).
    pub(super) fn own_heartbeat_back(&self, sent: u64) -> bool {
        self.own_sent
            .fetch_max(sent, std::sync::atomic::Ordering::SeqCst)
            < sent
    }

    /// This replica's lease, in milliseconds, as its messages carry it.
    pub(super) fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// Another replica's heartbeat (`sent` on its clock, its lease) was delivered; `false`
    /// for a replay of one already seen.
    pub(super) fn heard(&self, replica: &str, sent: u64, lease_ms: u64) -> bool {
        let now = Instant::now();
        let heard = Heard {
            at: now,
            sent,
            lease: Duration::from_millis(lease_ms),
        };
        let mut state = self.lock();
        // Replicas gone for good are forgotten after a while, not at once: what they last
        // sent is what tells a replay from a heartbeat.
        if state.heard.len() > 256 {
            state
                .heard
                .retain(|_, heard| now.duration_since(heard.at) < FORGET_AFTER);
        }
        match state.heard.get_mut(replica) {
            Some(known) if known.sent >= sent => false,
            Some(known) => {
                *known = heard;
                true
            }
            None => {
                state.heard.insert(replica.into(), heard);
                true
            }
        }
    }

    /// A replica of an older version was heard.
    pub(super) fn heard_legacy(&self) {
        self.lock().legacy = Some(Instant::now());
    }

    /// The longest lease of this replica and every replica heard lately: how long a write
    /// that cannot complete its round waits.
    fn longest_lease(&self) -> Duration {
        let now = Instant::now();
        let state = self.lock();
        state
            .heard
            .values()
            .filter(|heard| now.duration_since(heard.at) < FORGET_AFTER)
            .map(|heard| heard.lease)
            .fold(self.lease, Duration::max)
    }

    /// One of our own fences came back: every replica heard within the lease must now
    /// acknowledge it.
    pub(super) fn echoed(&self, nonce: u64) {
        let now = Instant::now();
        let mut state = self.lock();
        let within = |at: Instant, lease: Duration| now.duration_since(at) < lease;
        let longest = state
            .heard
            .values()
            .map(|heard| heard.lease)
            .fold(self.lease, Duration::max);
        let listened = state.listening_since.map(|since| now.duration_since(since));
        let legacy = state.legacy.is_some_and(|at| within(at, longest));
        let heard = state
            .heard
            .iter()
            .filter(|(_, heard)| within(heard.at, heard.lease))
            .map(|(replica, _)| replica.clone())
            .collect();
        // The first delivery counts; a replayed echo changes nothing.
        if let Some(pending) = state.pending.get_mut(&nonce)
            && pending.expected.is_none()
        {
            pending.expected = Some(Expected {
                heard,
                listened,
                longest,
                legacy,
            });
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
    /// round cannot complete by `deadline` (no listener, no key, the database refused the
    /// fence, a replica did not answer). A replica in the table with a longer lease moves
    /// `deadline` later.
    async fn round(&self, committed: Instant, deadline: &mut Instant) -> bool {
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
            lease_ms: self.lease_ms(),
        };
        // The replica table is read in the same statement: after the write's commit, so a
        // replica that registered with a heartbeat sent before the commit is in it. Each
        // row counts for twice its lease and a second, against the database's clock.
        // (The table is read inside `array(...)` so that pg_notify runs once whatever the
        // table holds: a join with an empty table might never evaluate it.)
        let sent = sqlx::query_scalar::<_, Vec<String>>(
            "SELECT array(
                 SELECT r.id || ' ' || r.lease_ms FROM tokend_replicas AS r
                 WHERE r.seen > clock_timestamp() - (r.lease_ms * 2 + 1000) * interval '1 ms')
             FROM (SELECT pg_notify($1, $2)) AS fence",
        )
        .bind(CONTROL)
        .bind(fence.signed(key))
        .fetch_one(&self.pool);
        let Ok(Ok(rows)) = tokio::time::timeout_at((*deadline).into(), sent).await else {
            return false;
        };
        let mut registered = Vec::with_capacity(rows.len());
        for row in &rows {
            let (id, lease_ms) = row.split_once(' ').unwrap_or((row.as_str(), ""));
            // An unreadable lease cannot be waited out by a bound we know: no completion.
            let Ok(lease_ms) = lease_ms.parse::<u64>() else {
                return false;
            };
            let lease = Duration::from_millis(lease_ms);
            *deadline = (*deadline).max(committed + lease);
            registered.push((id.to_owned(), lease));
        }
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change in between is not missed.
            changed.as_mut().enable();
            if self.complete(nonce, &registered) {
                return true;
            }
            if tokio::time::timeout_at((*deadline).into(), changed)
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    fn complete(&self, nonce: u64, registered: &[(String, Duration)]) -> bool {
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
        // Young against the longest lease of anyone, the table's included.
        let longest = registered
            .iter()
            .map(|(_, lease)| *lease)
            .fold(expected.longest, Duration::max);
        let young = expected.listened.is_none_or(|listened| listened < longest);
        let registered_all = !young || !registered.iter().any(|(r, _)| waits_for(r.as_str()));
        !expected.legacy && heard_all && registered_all
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
        let mut deadline = committed + self.longest_lease();
        if self.round(committed, &mut deadline).await {
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
            lease_ms: 2000,
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
        let stored = Key::from_hex(&blake3::Hash::from_bytes(key.0).to_hex()).unwrap();
        assert_eq!(stored.0, key.0);
        assert!(Key::from_hex("abc").is_none());
        assert!(Key::from_hex(&"zz".repeat(32)).is_none());
    }

    fn fences(lease_ms: u64) -> Fences {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nowhere.invalid/none")
            .unwrap();
        Fences::new(pool, Duration::from_millis(lease_ms))
    }

    #[tokio::test]
    async fn a_replayed_heartbeat_is_not_a_heartbeat() {
        let fences = fences(2000);
        assert!(fences.own_heartbeat_back(100));
        assert!(!fences.own_heartbeat_back(100), "our own, again");
        assert!(!fences.own_heartbeat_back(99));
        assert!(fences.own_heartbeat_back(101));
        assert!(fences.heard("00ab", 100, 2000));
        assert!(!fences.heard("00ab", 100, 2000), "the same heartbeat again");
        assert!(!fences.heard("00ab", 50, 2000), "an older one");
        assert!(fences.heard("00ab", 101, 2000));
    }

    #[tokio::test]
    async fn a_write_waits_out_the_longest_lease_heard_and_for_every_replica_within_its_own() {
        let fences = fences(2000);
        fences.listening(Some(Instant::now() - Duration::from_secs(60)));
        assert_eq!(fences.longest_lease(), Duration::from_millis(2000));
        fences.heard("00ab", 1, 10_000);
        fences.heard("00cd", 1, 5);
        assert_eq!(fences.longest_lease(), Duration::from_millis(10_000));
        std::thread::sleep(Duration::from_millis(10));
        // 00cd's heartbeat is older than its own 5 ms lease: it cannot be serving from it.
        fences.lock().pending.insert(7, Pending::default());
        fences.echoed(7);
        assert!(!fences.complete(7, &[]));
        fences.acked(7, "00ab");
        assert!(fences.complete(7, &[]));
        // An old listener does not wait for replicas in the table it has not heard.
        assert!(fences.complete(7, &[("00ef".to_owned(), Duration::from_secs(2))]));
        // Unless the table has a replica whose lease is longer than our listener's age.
        assert!(!fences.complete(7, &[("00ef".to_owned(), Duration::from_secs(120))]));
    }

    #[tokio::test]
    async fn a_young_listener_waits_for_the_table_and_an_older_version_for_the_lease() {
        let fences = fences(2000);
        fences.listening(Some(Instant::now()));
        fences.lock().pending.insert(7, Pending::default());
        fences.echoed(7);
        assert!(
            fences.complete(7, &[(fences.me().to_owned(), Duration::from_secs(2))]),
            "not for itself"
        );
        assert!(!fences.complete(7, &[("00ef".to_owned(), Duration::from_secs(2))]));
        fences.acked(7, "00ef");
        assert!(fences.complete(7, &[("00ef".to_owned(), Duration::from_secs(2))]));

        fences.heard_legacy();
        fences.lock().pending.insert(8, Pending::default());
        fences.echoed(8);
        assert!(
            !fences.complete(8, &[]),
            "an older replica never acknowledges"
        );
    }
}
