//! The Introspect path: parse → checksum → live state (cached) → verified-secret cache or
//! argon2 → live rules → answer.
//!
//! Caller authentication runs through here too, so every credential is checked exactly as
//! an Introspect of it would be. The order is a security decision: the secret is verified
//! *before* the token's state is evaluated, so nobody learns that a token is revoked,
//! expired or suspended without holding its secret.
//!
//! Steady state: zero database round trips and zero argon2 calls per Introspect.

pub mod cache;
pub mod last_used;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use secrecy::{ExposeSecret as _, SecretString};

use crate::domain::Result;
use crate::domain::model::{InactiveReason, LiveGrant, Token};
use crate::domain::ports::{Clock, SecretHasher, Store, Verification};
use crate::domain::rules;
use crate::domain::token_format::{ParsedToken, TokenFormat, TokenKind};

use cache::LiveCache;
use last_used::LastUsed;

/// A live token and what it may do now.
#[derive(Debug)]
pub struct ActiveToken {
    /// The token's record (shared with the live-state cache).
    pub token: Arc<Token>,
    /// Its effective permissions and groups.
    pub grant: LiveGrant,
    /// The last use on record (Unix ms), so a remembered verdict notes uses cheaply.
    last_noted: AtomicI64,
    /// Digest of the (client IP, caller) the token was last noted as used from, and when
    /// (Unix ms): a token used from one place costs no map or cache to note.
    last_site: AtomicU64,
    last_site_ms: AtomicI64,
}

/// The verdict on a token string.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Live.
    Active(Arc<ActiveToken>),
    /// Not live, and why (for logs, metrics and trusted callers only).
    Inactive(InactiveReason),
}

/// 128 bits of BLAKE3. The caches only need second-preimage resistance: to reach a
/// verified entry one must produce a string with the digest of a token string someone else
/// holds, 2^128 work; a birthday collision (2^64) between two strings of one's own choosing
/// gains nothing, as neither was verified. Half of a full digest is 32 bytes less in each of
/// the three caches a cached token has entries in.
type Digest = [u8; 16];

/// What the caches key secrets by: a cryptographic hash, so no plaintext secret is kept in
/// memory and no string but the token itself finds its entry. BLAKE3 rather than SHA-256
/// because it is computed twice on every call, and without SHA instructions in the CPU
/// SHA-256 cost more than the rest of a warm Introspect's own work.
fn digest(bytes: &[u8]) -> Digest {
    // The one-shot `hash` is the fast path for short inputs; its first 16 bytes are the
    // 128-bit output.
    let mut out = [0; 16];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..16]);
    out
}

/// The digest of a token string, from what it is made of: its kind, public id and secret,
/// `_`-separated (the prefix is the deployment's and the checksum follows from the rest, so
/// these name the string). 57 bytes fit BLAKE3's one 64-byte block, where the full string
/// (some 70) takes two compressions; this is computed twice on every call.
fn token_digest(parsed: &ParsedToken<'_>) -> Digest {
    let kind: &[u8] = match parsed.kind {
        TokenKind::Personal => b"p_",
        TokenKind::ApiKey => b"k_",
    };
    let parts = [
        kind,
        parsed.public_id.as_bytes(),
        b"_",
        parsed.secret.as_bytes(),
    ];
    let mut block = [0u8; 64];
    let mut len = 0;
    for part in parts {
        // The format fixes the lengths; were they ever longer, hash the parts as a stream.
        let Some(slot) = block.get_mut(len..len + part.len()) else {
            let mut hasher = blake3::Hasher::new();
            parts.iter().for_each(|part| {
                hasher.update(part);
            });
            let mut out = [0; 16];
            out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
            return out;
        };
        slot.copy_from_slice(part);
        len += part.len();
    }
    digest(&block[..len])
}

/// The credential last checked on one connection, its digest and the verdict last found
/// for it. A client sends the same `authorization` value on every call of a connection;
/// remembering the digest spares each of its calls the parse and the BLAKE3 compression, and
/// the verdict the lookup in the shared cache. The verdict is a copy of the shared cache's,
/// checked the same way ([`Remembered::holds`]): the same generation, so any invalidation
/// voids it here as there.
///
/// It keeps the credential for the life of the connection (as the connection's HTTP/2
/// header table does too, unless the client sends it never-indexed); zeroed when replaced
/// or dropped. Compared in constant time: a proxy may multiplex several clients'
/// credentials over one connection.
#[derive(Default)]
pub struct CredentialMemo(std::sync::Mutex<Option<Memo>>);

struct Memo {
    credential: SecretString,
    key: Digest,
    verdict: Option<Remembered>,
    /// When this connection last noted its credential's use (Unix ms): every call of the
    /// connection comes from one site (its peer, directly), so once a minute is enough.
    noted_ms: i64,
}

/// Says nothing of what is remembered: not even the digest.
impl std::fmt::Debug for CredentialMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialMemo").finish_non_exhaustive()
    }
}

/// What a connection's memo knows of a credential presented on it.
enum Memoed {
    /// Its verdict, still holding.
    Verdict(Outcome),
    /// Only its digest.
    Key(Digest),
}

impl CredentialMemo {
    /// What the memo knows of `candidate` at `generation` (`None`: the cache is not trusted)
    /// and `now`, if it is the credential remembered. A busy memo (another call of the
    /// connection holding it) is simply not used.
    fn recall(
        &self,
        candidate: &[u8],
        generation: Option<u64>,
        now: crate::domain::model::Timestamp,
    ) -> Option<Memoed> {
        let held = self.0.try_lock().ok()?;
        let memo = held.as_ref()?;
        if !constant_time_eq::constant_time_eq(
            memo.credential.expose_secret().as_bytes(),
            candidate,
        ) {
            return None;
        }
        Some(match (generation, &memo.verdict) {
            (Some(generation), Some(verdict)) if verdict.holds(generation, now) => {
                Memoed::Verdict(verdict.outcome.clone())
            }
            _ => Memoed::Key(memo.key),
        })
    }

    /// The digest of `candidate`, if it is the credential remembered.
    #[cfg(test)]
    fn digest_of(&self, candidate: &[u8]) -> Option<Digest> {
        let held = self.0.try_lock().ok()?;
        let memo = held.as_ref()?;
        constant_time_eq::constant_time_eq(memo.credential.expose_secret().as_bytes(), candidate)
            .then_some(memo.key)
    }

    fn remember(&self, candidate: &str, key: Digest) {
        if let Ok(mut held) = self.0.try_lock() {
            // Already held (its recall found the memo busy): keep its verdict.
            if held.as_ref().is_some_and(|memo| memo.key == key) {
                return;
            }
            *held = Some(Memo {
                credential: SecretString::from(candidate),
                key,
                verdict: None,
                noted_ms: i64::MIN,
            });
        }
    }

    /// Keeps `verdict` as the one of the credential whose digest is `key`, if that is still
    /// the credential remembered.
    fn keep(&self, key: &Digest, verdict: &Remembered) {
        if let Ok(mut held) = self.0.try_lock()
            && let Some(memo) = held.as_mut()
            && memo.key == *key
        {
            memo.verdict = Some(verdict.clone());
        }
    }

    /// Whether the use of `active`, the verdict remembered, was noted from this connection
    /// within the minute before `now`; if not, it is taken as noted now.
    fn noted_recently(
        &self,
        active: &Arc<ActiveToken>,
        now: crate::domain::model::Timestamp,
    ) -> bool {
        let Ok(mut held) = self.0.try_lock() else {
            return false;
        };
        let Some(memo) = held.as_mut() else {
            return false;
        };
        let Some(Remembered {
            outcome: Outcome::Active(remembered),
            ..
        }) = &memo.verdict
        else {
            return false;
        };
        if !Arc::ptr_eq(remembered, active) {
            return false;
        }
        let millis = now.timestamp_millis();
        if (0..last_used::RESOLUTION.num_milliseconds())
            .contains(&millis.saturating_sub(memo.noted_ms))
        {
            return true;
        }
        memo.noted_ms = millis;
        false
    }
}

/// Whether a remembered verdict still holds at `now` as far as time goes (expiry and the end
/// of a rotation's grace are the changes no invalidation announces).
fn still_valid(outcome: &Outcome, now: crate::domain::model::Timestamp) -> bool {
    match outcome {
        Outcome::Active(active) => active.token.ends_at().is_none_or(|at| at > now),
        Outcome::Inactive(_) => true,
    }
}

/// A token string as presented: a request's field, already text, or an `authorization`
/// header's bytes. Those are checked as text only when the connection's memo does not
/// hold them: the remembered credential was text when it was remembered, so bytes equal to
/// it need no check of their own (about 130 instructions a call).
#[derive(Clone, Copy)]
pub enum Presented<'a> {
    /// A string field.
    Text(&'a str),
    /// A header value, past `Bearer `.
    Header(&'a [u8]),
}

/// Says nothing of the token.
impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presented").finish_non_exhaustive()
    }
}

impl<'a> Presented<'a> {
    fn bytes(self) -> &'a [u8] {
        match self {
            Self::Text(text) => text.as_bytes(),
            Self::Header(bytes) => bytes,
        }
    }

    /// As text; `None` if it is not UTF-8 (then it is no token either).
    fn text(self) -> Option<&'a str> {
        match self {
            Self::Text(text) => Some(text),
            Self::Header(bytes) => std::str::from_utf8(bytes).ok(),
        }
    }
}

/// A call's time, read from the clock the first time it is asked for: judging a malformed
/// string needs no time, and every use within the call sees the same instant (the verdict's
/// time is the time its use is noted at).
pub struct CallTime<'c> {
    clock: &'c dyn Clock,
    at: Option<crate::domain::model::Timestamp>,
}

impl CallTime<'_> {
    /// The call's time: the clock's, the first time.
    pub fn get(&mut self) -> crate::domain::model::Timestamp {
        *self.at.get_or_insert_with(|| self.clock.now())
    }
}

impl std::fmt::Debug for CallTime<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallTime").field("at", &self.at).finish()
    }
}

/// Answers "is this token string live, and with which rights?".
#[derive(Debug)]
pub struct Introspector {
    store: Arc<dyn Store>,
    hasher: Arc<dyn SecretHasher>,
    clock: Arc<dyn Clock>,
    format: TokenFormat,
    /// Digest of a full token string → digest of the PHC hash argon2 accepted it against.
    /// Keyed by the whole string, so a hit means this exact secret was verified on this
    /// replica; tied to the hash, so a rehash or a different row never matches.
    verified: quick_cache::sync::Cache<Digest, Digest>,
    /// The same for strings argon2 rejected: repeated wrong secrets cost no CPU.
    rejected: quick_cache::sync::Cache<Digest, Digest>,
    /// Recent verdicts by digest of the token string, each stamped with the live-state
    /// cache's generation when its computation began: any invalidation since makes it void,
    /// so a hot token costs one lookup instead of five plus a verification.
    answers: quick_cache::sync::Cache<Digest, Remembered>,
    /// The live-state cache whose generation and trust the verdicts follow.
    live: Option<Arc<LiveCache>>,
    last_used: Arc<LastUsed>,
    /// Decisions made again, by [`Redecision`] (one call may count under several).
    redecided: [AtomicU64; 3],
}

/// How many times a call decides again because its state changed while it decided.
const REDECIDE_LIMIT: usize = 4;

/// Why a call decided again before answering "active" (see [`Introspector::introspect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redecision {
    /// An invalidation concerning the token's state arrived while it decided.
    Touched,
    /// The cache it read from stopped being trusted while it decided.
    Untrusted,
    /// Its state was read longer ago than a write waits for a silent replica (the lease).
    Outlived,
}

impl Redecision {
    const ALL: [Redecision; 3] = [Self::Touched, Self::Untrusted, Self::Outlived];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Touched => "touched",
            Self::Untrusted => "untrusted",
            Self::Outlived => "outlived",
        }
    }
}

/// What [`Introspector::recall`] found.
#[derive(Debug)]
enum Recall<'a> {
    /// The verdict, given without a wait.
    Known(Outcome),
    /// No verdict held; deciding needs the database or argon2.
    Missing(Miss<'a>),
}

/// What a decision needs from the recall that found no verdict.
struct Miss<'a> {
    key: Digest,
    /// `None` when the connection's memo knew the digest: parsed only if needed.
    parsed: Option<crate::domain::token_format::ParsedToken<'a>>,
    /// The verdict found but no longer holding, if any.
    known: Option<Remembered>,
    /// Whether the cache was trusted, and its generation, both read before the cache was.
    trusted: bool,
    observed: Option<u64>,
}

impl std::fmt::Debug for Miss<'_> {
    // The parsed token holds the secret; the digest is derived from it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Miss")
            .field("trusted", &self.trusted)
            .field("observed", &self.observed)
            .finish_non_exhaustive()
    }
}

/// A verdict and the generation it was computed at.
#[derive(Clone, Debug)]
struct Remembered {
    generation: u64,
    /// When it was computed (Unix ms): a backstop age for a verdict, should an invalidation
    /// ever be missed (a trigger bypassed by a restore, say). Milliseconds rather than a
    /// `Timestamp`: checked on every hit, where chrono's date arithmetic cost about a hundred
    /// instructions, and 8 bytes smaller in each of up to a million entries.
    at_ms: i64,
    outcome: Outcome,
}

/// The oldest remembered verdict served, whatever the generation says.
const MAX_VERDICT_AGE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

impl Remembered {
    fn new(generation: u64, at: crate::domain::model::Timestamp, outcome: Outcome) -> Self {
        Self {
            generation,
            at_ms: at.timestamp_millis(),
            outcome,
        }
    }

    /// Still servable at `now`: same generation, young enough (a clock stepped back
    /// counts as too old), and not past the token's expiry.
    fn holds(&self, generation: u64, now: crate::domain::model::Timestamp) -> bool {
        self.generation == generation
            && (0..MAX_VERDICT_AGE.num_milliseconds())
                .contains(&now.timestamp_millis().saturating_sub(self.at_ms))
            && still_valid(&self.outcome, now)
    }
}

impl Introspector {
    /// An introspector over these ports. `store` should be the caching store over `live`.
    pub fn new(
        store: Arc<dyn Store>,
        hasher: Arc<dyn SecretHasher>,
        clock: Arc<dyn Clock>,
        format: TokenFormat,
        last_used: Arc<LastUsed>,
        live: Option<Arc<LiveCache>>,
    ) -> Self {
        Self {
            store,
            hasher,
            clock,
            format,
            verified: quick_cache::sync::Cache::new(1_000_000),
            rejected: quick_cache::sync::Cache::new(100_000),
            // As many as verified secrets: a verdict also carries its token's last use, and
            // losing it to eviction would mean a write per recomputation.
            answers: quick_cache::sync::Cache::new(1_000_000),
            live,
            last_used,
            redecided: Default::default(),
        }
    }

    /// How many decisions this replica made again for `cause`.
    pub fn redecisions(&self, cause: Redecision) -> u64 {
        self.redecided[cause as usize].load(Ordering::Relaxed)
    }

    /// Counts a decision made again, under each cause that holds.
    fn count_redecision(&self, causes: [bool; 3]) {
        for (cause, _) in Redecision::ALL.into_iter().zip(causes).filter(|(_, c)| *c) {
            self.redecided[cause as usize].fetch_add(1, Ordering::Relaxed);
            metrics::counter!("tokend_introspect_redecisions_total", "cause" => cause.as_str())
                .increment(1);
        }
    }

    /// Entries held by each per-token-string cache, for the metrics endpoint.
    pub fn cache_entries(&self) -> [(&'static str, u64); 3] {
        [
            ("verified", self.verified.len() as u64),
            ("rejected", self.rejected.len() as u64),
            ("verdicts", self.answers.len() as u64),
        ]
    }

    /// The verdict on `candidate`. An `Err` means tokend cannot know (database
    /// unreachable): it is never turned into "inactive".
    ///
    /// `now` is the call's time (see [`now`](Self::now)), read once per call and shared with
    /// [`note_use`](Self::note_use), so the use noted is the time of the verdict.
    pub async fn introspect(
        &self,
        candidate: &str,
        now: crate::domain::model::Timestamp,
    ) -> Result<Outcome> {
        self.introspect_remembering(Presented::Text(candidate), None, now)
            .await
    }

    /// [`introspect`](Self::introspect), for a credential that came on a connection with
    /// `memo`.
    pub async fn introspect_remembering(
        &self,
        candidate: Presented<'_>,
        memo: Option<&CredentialMemo>,
        now: crate::domain::model::Timestamp,
    ) -> Result<Outcome> {
        match self.recall(candidate, memo, &mut self.time_at(now)) {
            Recall::Known(outcome) => Ok(outcome),
            // Boxed: a decision may query the database and wait for argon2, and its state
            // would otherwise be part of every call's future, hit or miss. Moving that much
            // on each call, and allocating it past the allocator's small-block caches, cost
            // the hit path more than this one allocation costs a miss.
            Recall::Missing(miss) => Box::pin(self.decide_missing(candidate, miss, now)).await,
        }
    }

    /// The verdict on `candidate` if it needs no wait (see `recall`): what
    /// [`introspect_remembering`](Self::introspect_remembering) would answer at once, at the
    /// call's time `now` (from [`call_time`](Self::call_time)).
    pub fn recall_at_once(
        &self,
        candidate: Presented<'_>,
        memo: Option<&CredentialMemo>,
        now: &mut CallTime<'_>,
    ) -> Option<Outcome> {
        match self.recall(candidate, memo, now) {
            Recall::Known(outcome) => Some(outcome),
            Recall::Missing(_) => None,
        }
    }

    /// `candidate` as text and as a token, if it is one.
    fn parse<'a>(
        &self,
        candidate: Presented<'a>,
    ) -> Option<(&'a str, crate::domain::token_format::ParsedToken<'a>)> {
        let text = candidate.text()?;
        Some((text, self.format.parse(text)?))
    }

    /// The verdict on `candidate` if it needs no wait: the string is malformed, or a
    /// remembered verdict still holds. Otherwise what deciding it will need.
    fn recall<'a>(
        &self,
        candidate: Presented<'a>,
        memo: Option<&CredentialMemo>,
        now: &mut CallTime<'_>,
    ) -> Recall<'a> {
        // Read before any state: an invalidation after this point voids what we compute.
        let read_live = || {
            let trusted = self.live.as_ref().is_some_and(|live| live.is_trusted());
            (trusted, self.live.as_ref().map(|live| live.generation()))
        };
        // Malformed strings stop at the parse: no cache, no query, no hash. Without a memo
        // that could know the string, nothing is read before it.
        let parse = || {
            let (text, parsed) = self.parse(candidate)?;
            Some((text, token_digest(&parsed), parsed))
        };
        let malformed = || Recall::Known(Outcome::Inactive(InactiveReason::Malformed));
        let (key, parsed, (trusted, observed)) = match memo {
            Some(memo) => {
                let live = read_live();
                let generation = live.1.filter(|_| live.0);
                let now = now.get();
                match memo.recall(candidate.bytes(), generation, now) {
                    Some(Memoed::Verdict(outcome)) => {
                        if let Outcome::Active(active) = &outcome {
                            self.last_used.touch(active, now);
                        }
                        return Recall::Known(outcome);
                    }
                    Some(Memoed::Key(key)) => (key, None, live),
                    None => {
                        let Some((text, key, parsed)) = parse() else {
                            return malformed();
                        };
                        memo.remember(text, key);
                        (key, Some(parsed), live)
                    }
                }
            }
            None => {
                let Some((_, key, parsed)) = parse() else {
                    return malformed();
                };
                (key, Some(parsed), read_live())
            }
        };
        let generation = observed.filter(|_| trusted);
        let now = now.get();
        let known = self.answers.get(&key);
        if let Some(generation) = generation
            && let Some(known) = &known
            && known.holds(generation, now)
        {
            if let Outcome::Active(active) = &known.outcome {
                self.last_used.touch(active, now);
            }
            if let Some(memo) = memo {
                memo.keep(&key, known);
            }
            return Recall::Known(known.outcome.clone());
        }
        Recall::Missing(Miss {
            key,
            parsed,
            known,
            trusted,
            observed,
        })
    }

    /// [`introspect_remembering`](Self::introspect_remembering) when no verdict held:
    /// decides from live state, again while what it read may be stale, and remembers the
    /// verdict if the cache was trusted throughout.
    async fn decide_missing(
        &self,
        candidate: Presented<'_>,
        miss: Miss<'_>,
        now: crate::domain::model::Timestamp,
    ) -> Result<Outcome> {
        let Miss {
            key,
            parsed,
            known,
            mut trusted,
            mut observed,
        } = miss;
        // Only a remembered digest skips the parse, and only a string that parsed before
        // is remembered.
        let Some(parsed) = parsed.or_else(|| self.parse(candidate).map(|(_, parsed)| parsed))
        else {
            return Ok(Outcome::Inactive(InactiveReason::Malformed));
        };
        // A verdict voided by an invalidation still knows when its token was last noted.
        let noted = known.and_then(|known| match &known.outcome {
            Outcome::Active(active) => Some(active.last_noted.load(Ordering::Relaxed)),
            Outcome::Inactive(_) => None,
        });
        let mut read = std::time::Instant::now();
        let mut outcome = self.decide(key, &parsed, now, noted).await?;
        // A call that decided across an invalidation of its token's state (read from the
        // cache or the database, then perhaps an argon2 verification) may be answering after
        // a revocation's write has returned, this replica having acknowledged it: decide
        // again rather than answer "active" from what was read before. The same if the state
        // came from a cache no longer trusted, or was read longer ago than a write waits for
        // a replica that cannot acknowledge it. Bounded: a token whose state keeps changing
        // under every attempt gets UNAVAILABLE, never a verdict from old state.
        let mut attempts = 0;
        while let (Outcome::Active(active), Some(live)) = (&outcome, &self.live) {
            let current = live.generation();
            let touched = observed.is_some_and(|before| {
                before != current && live.touched_since(before, &active.token)
            });
            let untrusted = trusted && !live.is_trusted();
            let outlived = live.outlived(read);
            if !touched && !untrusted && !outlived {
                // Nothing since concerned it: the verdict holds as of now.
                observed = Some(current);
                break;
            }
            self.count_redecision([touched, untrusted, outlived]);
            attempts += 1;
            if attempts > REDECIDE_LIMIT {
                return Err(crate::domain::Error::Unavailable(
                    "the token's state kept changing while it was being decided".into(),
                ));
            }
            trusted = live.is_trusted();
            observed = Some(live.generation());
            read = std::time::Instant::now();
            outcome = self.decide(key, &parsed, now, noted).await?;
        }
        if let (true, Some(generation)) = (trusted, observed) {
            self.answers
                .insert(key, Remembered::new(generation, now, outcome.clone()));
        }
        Ok(outcome)
    }

    /// The full decision, from live state and the secret.
    async fn decide(
        &self,
        key: Digest,
        parsed: &crate::domain::token_format::ParsedToken<'_>,
        now: crate::domain::model::Timestamp,
        noted: Option<i64>,
    ) -> Result<Outcome> {
        let Some(state) = self.held_state(key, parsed).await? else {
            return Ok(Outcome::Inactive(InactiveReason::Unknown));
        };
        match rules::evaluate(&state, now) {
            Ok(grant) => {
                let noted = self.last_used.record(&state.token, now, noted);
                Ok(Outcome::Active(Arc::new(ActiveToken {
                    token: state.token,
                    grant,
                    last_noted: AtomicI64::new(noted.timestamp_millis()),
                    last_site: AtomicU64::new(0),
                    last_site_ms: AtomicI64::new(0),
                })))
            }
            Err(reason) => Ok(Outcome::Inactive(reason)),
        }
    }

    /// Notes that the live token of `active` was used from `client_ip` through `service`
    /// (`None`: as the credential of a call to tokend). Never waits on I/O.
    pub fn note_use(
        &self,
        active: &ActiveToken,
        client_ip: Option<std::net::IpAddr>,
        service: Option<last_used::Service<'_>>,
        now: crate::domain::model::Timestamp,
    ) {
        self.last_used.note_site(active, client_ip, service, now);
    }

    /// [`note_use`](Self::note_use) of a credential of a call to tokend, presented on a
    /// connection with `memo`: at most once a minute per connection.
    pub fn note_credential_use(
        &self,
        active: &Arc<ActiveToken>,
        peer: Option<std::net::IpAddr>,
        memo: Option<&CredentialMemo>,
        now: crate::domain::model::Timestamp,
    ) {
        if memo.is_some_and(|memo| memo.noted_recently(active, now)) {
            return;
        }
        self.last_used.note_site(active, peer, None, now);
    }

    /// The time of a call, for [`introspect`](Self::introspect) and
    /// [`note_use`](Self::note_use).
    pub fn now(&self) -> crate::domain::model::Timestamp {
        self.clock.now()
    }

    /// The time of a call, read when first needed: for [`recall_at_once`](Self::recall_at_once).
    pub fn call_time(&self) -> CallTime<'_> {
        CallTime {
            clock: &*self.clock,
            at: None,
        }
    }

    /// A call's time already read.
    fn time_at(&self, now: crate::domain::model::Timestamp) -> CallTime<'_> {
        CallTime {
            clock: &*self.clock,
            at: Some(now),
        }
    }

    /// The state of the token whose secret `parsed` holds, whatever that state is; `None`
    /// for an unknown id or a wrong secret.
    async fn held_state(
        &self,
        key: Digest,
        parsed: &crate::domain::token_format::ParsedToken<'_>,
    ) -> Result<Option<crate::domain::model::TokenState>> {
        // Public ids are not secret, so answering an unknown one without running argon2
        // reveals nothing, and spends no CPU on the attacker's behalf.
        let Some(state) = self.store.token_state(parsed.public_id).await? else {
            return Ok(None);
        };
        if state.token.kind != parsed.kind
            || !self
                .secret_matches(key, parsed.secret, &state.token)
                .await?
        {
            return Ok(None);
        }
        Ok(Some(state))
    }

    /// The token `candidate` is the full string of, live or not: proof of holding its
    /// secret, which is what a leak report needs (a report naming only an id could revoke
    /// anybody's token).
    pub async fn held_token(&self, candidate: &str) -> Result<Option<Arc<Token>>> {
        let Some(parsed) = self.format.parse(candidate) else {
            return Ok(None);
        };
        let key = token_digest(&parsed);
        Ok(self
            .held_state(key, &parsed)
            .await?
            .map(|state| state.token))
    }

    /// Whether `secret` is the token's, by cache or by argon2 (once per token and replica;
    /// concurrent first sights of the same string share one verification).
    async fn secret_matches(&self, key: Digest, secret: &str, token: &Token) -> Result<bool> {
        let hash = digest(token.secret_hash.0.as_bytes());
        match self.verified.get(&key) {
            Some(known) if known == hash => {
                metrics::counter!("tokend_verified_cache_total", "result" => "hit").increment(1);
                return Ok(true);
            }
            // Verified against another hash (rehashed since): verify afresh.
            Some(_) => {
                self.verified.remove(&key);
            }
            None => {}
        }
        if self.rejected.get(&key) == Some(hash) {
            metrics::counter!("tokend_verified_cache_total", "result" => "rejected").increment(1);
            return Ok(false);
        }
        metrics::counter!("tokend_verified_cache_total", "result" => "miss").increment(1);
        // One caller per string verifies; the others wait for its answer. A caller whose
        // verification did not match leaves no value, and the next waiter in line takes over
        // (and finds the string in `rejected`, which is written before the guard is dropped).
        let guard = match self.verified.get_value_or_guard_async(&key).await {
            Ok(known) if known == hash => return Ok(true),
            Ok(_) => None,
            Err(guard) => Some(guard),
        };
        if self.rejected.get(&key) == Some(hash) {
            return Ok(false);
        }
        let phc = token.secret_hash.0.to_string();
        match self.hasher.verify(SecretString::from(secret), phc).await? {
            Verification::Match { needs_rehash } => {
                if needs_rehash {
                    self.upgrade_hash(token.id(), &token.secret_hash.0, secret);
                }
                match guard {
                    Some(guard) => {
                        let _ = guard.insert(hash);
                    }
                    None => self.verified.insert(key, hash),
                }
                Ok(true)
            }
            Verification::Mismatch => {
                self.rejected.insert(key, hash);
                drop(guard);
                Ok(false)
            }
        }
    }

    /// Rehashes a secret whose stored hash uses old parameters, off the request's path.
    fn upgrade_hash(&self, id: &str, old: &str, secret: &str) {
        let store = Arc::clone(&self.store);
        let hasher = Arc::clone(&self.hasher);
        let id = id.to_owned();
        let old = old.to_owned();
        let secret = SecretString::from(secret);
        tokio::spawn(async move {
            let result = async {
                let new = hasher.hash(secret).await?;
                store.replace_hash(&id, &old, &new).await
            }
            .await;
            match result {
                Ok(true) => tracing::info!(token_id = %id, "upgraded the token's hash parameters"),
                Ok(false) => {}
                Err(err) => tracing::warn!(token_id = %id, error = %err, "hash upgrade failed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone as _, Utc};

    use super::*;

    #[test]
    fn token_digests_take_one_block_and_tell_tokens_apart() {
        let format = TokenFormat::new("tkd").unwrap();
        let pat = format.generate(TokenKind::Personal).full;
        let key = format.generate(TokenKind::ApiKey).full;
        let parsed = format.parse(&pat).unwrap();
        // Kind, separators, public id and secret: within one 64-byte block.
        assert!(2 + parsed.public_id.len() + 1 + parsed.secret.len() <= 64);
        assert_eq!(
            token_digest(&parsed),
            token_digest(&format.parse(&pat).unwrap())
        );
        assert_ne!(
            token_digest(&parsed),
            token_digest(&format.parse(&key).unwrap())
        );
        // The same id and secret under the other kind is another token.
        let as_key = ParsedToken {
            kind: TokenKind::ApiKey,
            ..format.parse(&pat).unwrap()
        };
        assert_ne!(token_digest(&parsed), token_digest(&as_key));
    }

    #[test]
    fn a_connection_memo_answers_only_for_the_very_string_it_remembers() {
        let memo = CredentialMemo::default();
        assert_eq!(memo.digest_of(b"tkd_pat_abc"), None);
        memo.remember("tkd_pat_abc", [1; 16]);
        assert_eq!(memo.digest_of(b"tkd_pat_abc"), Some([1; 16]));
        for other in ["tkd_pat_abd", "tkd_pat_ab", "tkd_pat_abcd", ""] {
            assert_eq!(memo.digest_of(other.as_bytes()), None, "{other}");
        }
        memo.remember("tkd_key_xyz", [2; 16]);
        assert_eq!(
            memo.digest_of(b"tkd_pat_abc"),
            None,
            "one credential at a time"
        );
        assert_eq!(memo.digest_of(b"tkd_key_xyz"), Some([2; 16]));
    }

    fn active() -> Arc<ActiveToken> {
        use crate::domain::model::{LiveGrant, PermissionSet, Token};
        Arc::new(ActiveToken {
            token: Arc::new(Token::sample("AAAAAAAAAAAA")),
            grant: LiveGrant {
                permissions: Arc::new(PermissionSet::new()),
                groups: Arc::default(),
                builtins: Default::default(),
            },
            last_noted: AtomicI64::new(0),
            last_site: AtomicU64::new(0),
            last_site_ms: AtomicI64::new(0),
        })
    }

    fn recalled(
        memo: &CredentialMemo,
        generation: Option<u64>,
        at: crate::domain::model::Timestamp,
    ) -> &'static str {
        match memo.recall(b"tkd_pat_abc", generation, at) {
            Some(Memoed::Verdict(Outcome::Active(_))) => "active",
            Some(Memoed::Verdict(Outcome::Inactive(_))) => "inactive",
            Some(Memoed::Key(key)) if key == [1; 16] => "key",
            Some(Memoed::Key(_)) => "another key",
            None => "nothing",
        }
    }

    #[test]
    fn a_connection_memo_serves_its_credentials_verdict_only_while_the_shared_cache_would() {
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let memo = CredentialMemo::default();
        memo.remember("tkd_pat_abc", [1; 16]);
        let verdict = Remembered::new(7, at, Outcome::Active(active()));
        memo.keep(&[2; 16], &verdict);
        assert_eq!(
            recalled(&memo, Some(7), at),
            "key",
            "another credential's verdict"
        );
        memo.keep(&[1; 16], &verdict);
        assert_eq!(
            recalled(&memo, Some(7), at + TimeDelta::seconds(1)),
            "active"
        );
        // Remembered again (a call that found the memo busy): the verdict stays.
        memo.remember("tkd_pat_abc", [1; 16]);
        assert_eq!(recalled(&memo, Some(7), at), "active");
        // An invalidation since, a cache not trusted, an aged verdict: only the digest, and
        // the shared cache decides.
        assert_eq!(recalled(&memo, Some(8), at), "key");
        assert_eq!(recalled(&memo, None, at), "key");
        assert_eq!(recalled(&memo, Some(7), at + MAX_VERDICT_AGE), "key");
        assert!(memo.recall(b"tkd_pat_abd", Some(7), at).is_none());
        // Another credential on the connection, then the first again: its verdict is gone.
        memo.remember("tkd_key_xyz", [2; 16]);
        memo.remember("tkd_pat_abc", [1; 16]);
        assert_eq!(recalled(&memo, Some(7), at), "key");
    }

    #[test]
    fn a_connection_notes_its_credentials_use_once_a_minute() {
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let memo = CredentialMemo::default();
        let token = active();
        assert!(!memo.noted_recently(&token, at), "nothing remembered");
        memo.remember("tkd_pat_abc", [1; 16]);
        memo.keep(
            &[1; 16],
            &Remembered::new(7, at, Outcome::Active(Arc::clone(&token))),
        );
        assert!(!memo.noted_recently(&token, at));
        assert!(memo.noted_recently(&token, at + TimeDelta::seconds(59)));
        assert!(!memo.noted_recently(&token, at + last_used::RESOLUTION));
        assert!(
            !memo.noted_recently(&active(), at + TimeDelta::seconds(61)),
            "another verdict"
        );
        // A clock stepped back notes again.
        assert!(!memo.noted_recently(&token, at + TimeDelta::seconds(30)));
        // Another credential on the connection starts afresh.
        memo.remember("tkd_key_xyz", [2; 16]);
        memo.keep(
            &[2; 16],
            &Remembered::new(7, at, Outcome::Active(Arc::clone(&token))),
        );
        assert!(!memo.noted_recently(&token, at + TimeDelta::seconds(31)));
    }

    fn remembered(generation: u64, at: crate::domain::model::Timestamp) -> Remembered {
        Remembered::new(generation, at, Outcome::Inactive(InactiveReason::Unknown))
    }

    #[test]
    fn a_remembered_verdict_holds_only_in_its_generation_and_for_a_minute() {
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let verdict = remembered(7, at);
        assert!(verdict.holds(7, at));
        assert!(verdict.holds(7, at + TimeDelta::seconds(59)));
        assert!(verdict.holds(7, at + MAX_VERDICT_AGE - TimeDelta::milliseconds(1)));
        // Any invalidation since voids it.
        assert!(!verdict.holds(8, at + TimeDelta::seconds(1)));
        // Even with no invalidation heard, it ages out.
        assert!(!verdict.holds(7, at + MAX_VERDICT_AGE));
        // A clock stepped back does not make it young forever.
        assert!(!verdict.holds(7, at - TimeDelta::seconds(1)));
        assert!(!verdict.holds(7, at - TimeDelta::milliseconds(1)));
    }
}
