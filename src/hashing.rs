//! argon2id for token secrets, off the async runtime and bounded.
//!
//! Default parameters (m = 256 KiB, t = 1, p = 1) are chosen for 256-bit random secrets, not
//! for passwords. Password guidance (OWASP: m = 19 MiB, t = 2) exists to slow guessing of
//! low-entropy human secrets; with 2^256 candidates no amount of hashing speed makes offline
//! guessing feasible, so extra cost buys no security and would only spend CPU and memory on
//! every cold verification (and hand an attacker a lever). argon2id is kept because the
//! contract asks for a PHC string, the parameters stay configurable for deployments whose
//! policy insists on more, and a server-side pepper (argon2's secret input) makes a stolen
//! database useless on its own.
//!
//! The hashes run on argon2's own threads at a lower scheduling priority (`nice`) than the
//! async runtime's. A hash is a contiguous stretch of CPU; at equal priority the kernel lets
//! it run out its time slice while a runtime thread with Introspect calls queued waits, and
//! every IssueToken (or a burst of wrong secrets) shows up in Introspect's p99. At a lower
//! priority the runtime gets the larger share; when the machine is idle the hashes run at
//! full speed. The kernel still lets a running hash finish its slice, which is why the
//! default memory cost is small: one hash then holds a core for well under a millisecond.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, Params, PasswordHasher as _, PasswordVerifier as _, Version};
use async_trait::async_trait;
use secrecy::{ExposeSecret as _, SecretBox, SecretString};
use tokio::sync::Semaphore;

use crate::domain::ports::{SecretHasher, Verification};
use crate::domain::{Error, Result};

/// argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Argon2Settings {
    /// Memory per hash, KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
    /// Hashes computed at once; 0 = one per CPU core. Each holds `memory_kib` of memory.
    pub max_concurrent: usize,
    /// The hashing threads' nice value (0–19; higher yields more readily to the runtime).
    pub nice: i32,
}

impl Default for Argon2Settings {
    fn default() -> Self {
        Self {
            memory_kib: 256,
            iterations: 1,
            parallelism: 1,
            max_concurrent: 0,
            nice: 10,
        }
    }
}

struct Inner {
    params: Params,
    pepper: Option<SecretBox<Vec<u8>>>,
}

impl Inner {
    fn argon2(&self) -> Result<Argon2<'_>> {
        match &self.pepper {
            Some(pepper) => Argon2::new_with_secret(
                pepper.expose_secret(),
                Algorithm::Argon2id,
                Version::V0x13,
                self.params.clone(),
            )
            .map_err(|e| Error::internal(format!("argon2 pepper rejected: {e}"))),
            None => Ok(Argon2::new(
                Algorithm::Argon2id,
                Version::V0x13,
                self.params.clone(),
            )),
        }
    }
}

/// argon2id on its own low-priority threads, at most `max_concurrent` at a time.
#[derive(Clone)]
pub struct Argon2Hasher {
    inner: Arc<Inner>,
    jobs: crossbeam_channel::Sender<Job>,
    /// Bounds the work handed to the threads, so a burst queues here (async, cancellable)
    /// rather than in their queue.
    permits: Arc<Semaphore>,
    verifications: Arc<AtomicU64>,
}

type Job = Box<dyn FnOnce() + Send>;

/// Starts `threads` hashing threads at nice value `nice`. They block on the queue when idle
/// (no spinning that would compete with the runtime) and end when the last sender is gone.
fn start_threads(threads: usize, nice: i32) -> Result<crossbeam_channel::Sender<Job>> {
    let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
    for i in 0..threads {
        let queue = queue.clone();
        std::thread::Builder::new()
            .name(format!("tokend-argon2-{i}"))
            .spawn(move || {
                lower_priority(nice);
                while let Ok(job) = queue.recv() {
                    // A panicking hash must not shrink the pool; its caller sees the
                    // dropped reply as a failed task.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|e| Error::internal(format!("could not start a hashing thread: {e}")))?;
    }
    Ok(jobs)
}

/// Gives the calling thread the nice value `nice`. On Linux `setpriority` on a thread id
/// affects that thread only, which is what lets the runtime's threads keep theirs.
fn lower_priority(nice: i32) {
    let tid = rustix::thread::gettid();
    if let Err(err) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::warn!(nice, error = %err, "could not lower the hashing thread's priority");
    }
}

impl std::fmt::Debug for Argon2Hasher {
    // The pepper stays out of every debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Argon2Hasher")
            .field("params", &self.inner.params)
            .field("peppered", &self.inner.pepper.is_some())
            .finish_non_exhaustive()
    }
}

impl Argon2Hasher {
    /// A hasher with these parameters and optional pepper.
    pub fn new(settings: &Argon2Settings, pepper: Option<SecretString>) -> Result<Self> {
        let params = Params::new(
            settings.memory_kib,
            settings.iterations,
            settings.parallelism,
            None,
        )
        .map_err(|e| Error::invalid("argon2", format!("invalid parameters: {e}")))?;
        let concurrency = match settings.max_concurrent {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let pepper =
            pepper.map(|p| SecretBox::new(Box::new(p.expose_secret().as_bytes().to_vec())));
        if pepper
            .as_ref()
            .is_some_and(|p| p.expose_secret().is_empty())
        {
            return Err(Error::invalid("pepper", "must not be empty when set"));
        }
        if !(0..=19).contains(&settings.nice) {
            return Err(Error::invalid("argon2.nice", "must be between 0 and 19"));
        }
        Ok(Self {
            inner: Arc::new(Inner { params, pepper }),
            jobs: start_threads(concurrency, settings.nice)?,
            permits: Arc::new(Semaphore::new(concurrency)),
            verifications: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How many verifications ran; tests and benchmarks show warm calls add none.
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        // The permit travels with the job, so it bounds work queued or running, even for
        // callers that gave up waiting.
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("hashing pool closed"))?;
        let inner = Arc::clone(&self.inner);
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _permit = permit;
                // A caller that went away (a cancelled request) needs no hash.
                if !done.is_closed() {
                    let _ = done.send(work(&inner));
                }
            }))
            .map_err(|_| Error::internal("hashing threads stopped"))?;
        result
            .await
            .map_err(|_| Error::internal("hashing task failed"))?
    }
}

#[async_trait]
impl SecretHasher for Argon2Hasher {
    async fn hash(&self, secret: SecretString) -> Result<String> {
        self.run(move |inner| {
            let hash = inner
                .argon2()?
                .hash_password(secret.expose_secret().as_bytes())
                .map_err(|e| Error::internal(format!("argon2 hash failed: {e}")))?;
            Ok(hash.to_string())
        })
        .await
    }

    async fn verify(&self, secret: SecretString, phc: String) -> Result<Verification> {
        self.verifications.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tokend_argon2_verifications_total").increment(1);
        let started = std::time::Instant::now();
        let verified = self
            .run(move |inner| {
                let parsed = PasswordHash::new(&phc).map_err(|e| {
                    Error::internal(format!("stored hash is not a PHC string: {e}"))
                })?;
                // The comparison inside `verify_password` is constant-time.
                match inner
                    .argon2()?
                    .verify_password(secret.expose_secret().as_bytes(), &parsed)
                {
                    Ok(()) => {
                        let current = &inner.params;
                        let needs_rehash = Params::try_from(&parsed).map_or(true, |stored| {
                            stored.m_cost() != current.m_cost()
                                || stored.t_cost() != current.t_cost()
                                || stored.p_cost() != current.p_cost()
                        }) || parsed.algorithm.as_str() != "argon2id";
                        Ok(Verification::Match { needs_rehash })
                    }
                    Err(argon2::password_hash::Error::PasswordInvalid) => {
                        Ok(Verification::Mismatch)
                    }
                    Err(e) => Err(Error::internal(format!("argon2 verify failed: {e}"))),
                }
            })
            .await;
        metrics::histogram!("tokend_argon2_verify_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        verified
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Argon2Settings {
        Argon2Settings {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
            max_concurrent: 2,
            nice: 10,
        }
    }

    #[tokio::test]
    async fn hashes_run_at_the_configured_lower_priority() {
        let hasher = Argon2Hasher::new(&Argon2Settings { nice: 7, ..cheap() }, None).unwrap();
        let (nice, name) = hasher
            .run(|_| {
                let tid = rustix::thread::gettid();
                let nice = rustix::process::getpriority_process(Some(tid))
                    .map_err(|e| Error::internal(e.to_string()))?;
                Ok((nice, std::thread::current().name().map(str::to_owned)))
            })
            .await
            .unwrap();
        assert_eq!(nice, 7);
        assert!(name.unwrap().starts_with("tokend-argon2-"));
        // The runtime's own thread keeps its priority.
        let here = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        assert_ne!(here, 7);
    }

    #[test]
    fn a_nice_value_outside_0_to_19_is_refused() {
        let err = Argon2Hasher::new(
            &Argon2Settings {
                nice: 20,
                ..cheap()
            },
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("argon2.nice"), "{err}");
    }

    #[tokio::test]
    async fn a_hash_verifies_its_secret_only() {
        let hasher = Argon2Hasher::new(&cheap(), None).unwrap();
        let phc = hasher.hash("s3cret".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"));
        assert_eq!(
            hasher.verify("s3cret".into(), phc.clone()).await.unwrap(),
            Verification::Match {
                needs_rehash: false
            }
        );
        assert_eq!(
            hasher.verify("other".into(), phc).await.unwrap(),
            Verification::Mismatch
        );
    }

    #[tokio::test]
    async fn a_pepper_is_needed_to_verify_a_peppered_hash() {
        let peppered = Argon2Hasher::new(&cheap(), Some("pepper".into())).unwrap();
        let plain = Argon2Hasher::new(&cheap(), None).unwrap();
        let phc = peppered.hash("s3cret".into()).await.unwrap();
        assert_eq!(
            plain.verify("s3cret".into(), phc.clone()).await.unwrap(),
            Verification::Mismatch
        );
        assert!(matches!(
            peppered.verify("s3cret".into(), phc).await.unwrap(),
            Verification::Match { .. }
        ));
    }

    #[tokio::test]
    async fn changed_parameters_ask_for_a_rehash() {
        let old = Argon2Hasher::new(&cheap(), None).unwrap();
        let new = Argon2Hasher::new(
            &Argon2Settings {
                memory_kib: 128,
                ..cheap()
            },
            None,
        )
        .unwrap();
        let phc = old.hash("s3cret".into()).await.unwrap();
        assert_eq!(
            new.verify("s3cret".into(), phc).await.unwrap(),
            Verification::Match { needs_rehash: true }
        );
    }

    #[tokio::test]
    async fn a_panicking_hash_fails_its_caller_and_keeps_its_thread() {
        let hasher = Argon2Hasher::new(
            &Argon2Settings {
                max_concurrent: 1,
                ..cheap()
            },
            None,
        )
        .unwrap();
        let failed = hasher
            .run(|_| -> Result<()> { panic!("a hash that panics") })
            .await
            .unwrap_err();
        let cause = std::error::Error::source(&failed).map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("hashing task failed"), "{failed:?}");
        // The pool's only thread is still there to hash.
        let phc = hasher.hash("s3cret".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$"));
    }

    #[tokio::test]
    async fn a_job_whose_caller_went_away_is_skipped() {
        // One thread and two permits, so a second job can wait in the queue.
        let hasher = Argon2Hasher {
            permits: Arc::new(Semaphore::new(2)),
            jobs: start_threads(1, 10).unwrap(),
            ..Argon2Hasher::new(&cheap(), None).unwrap()
        };
        let (open_gate, gate) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let hasher = hasher.clone();
            async move {
                hasher
                    .run(move |_| {
                        let _ = gate.recv();
                        Ok(())
                    })
                    .await
            }
        });
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let abandoned = tokio::spawn({
            let (hasher, ran) = (hasher.clone(), Arc::clone(&ran));
            async move {
                hasher
                    .run(move |_| {
                        ran.store(true, Ordering::SeqCst);
                        Ok(())
                    })
                    .await
            }
        });
        // Both permits taken means both jobs are queued (a job is sent in the same poll
        // that takes its permit).
        while hasher.permits.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        abandoned.abort();
        let _ = abandoned.await;
        open_gate.send(()).unwrap();
        busy.await.unwrap().unwrap();
        // A job queued after the abandoned one has run, so the abandoned one was reached.
        hasher.run(|_| Ok(())).await.unwrap();
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[test]
    fn debug_never_shows_the_pepper() {
        let hasher = Argon2Hasher::new(&cheap(), Some("hunter2-pepper".into())).unwrap();
        assert!(!format!("{hasher:?}").contains("hunter2"));
    }
}
