//! Introspect over real gRPC, beside the ceiling: a no-op tonic server returning the same
//! response, measured in the same run by the same load generator (h2load).
//!
//! `cargo bench --bench introspect` (needs `h2load` from Debian's nghttp2-client and
//! `taskset`). The servers run on core 0; the load generator and the bench's own clients on
//! core 1. Scenarios:
//! (a) a warm valid token, (b) garbage, (c) cold valid tokens (first sight, argon2),
//! (d) the warm token while IssueToken runs at 50/s, (e) the warm token while another
//! token's public id is flooded with distinct wrong secrets (each a real argon2
//! verification); and the memory per cached token.
//!
//! Environment: `BENCH_REQUESTS` (per h2load run, default 200000), `BENCH_CONCURRENCY`
//! (in-flight calls, default 64), `BENCH_ROUNDS` (rounds of (a), (b) and (d), each beside
//! its own ceiling run, default 3), `BENCH_SLICES` (in (a) and (b), tokend and the ceiling
//! take turns in this many slices of the run; in (d), slices with and without IssueToken
//! do; default 10), `BENCH_COLD` (cold tokens,
//! default 300),
//! `BENCH_ARGON2_KIB` / `BENCH_ARGON2_NICE` (override the argon2 defaults),
//! `BENCH_POSTGRES_URL` (run (a)–(e) on a fresh PostgreSQL database instead of SQLite),
//! `BENCH_NO_LOGS` (no log subscriber; by default the one `tokend serve` installs),
//! `BENCH_SQLITE_WORKER_CORE` (in (d), move the SQLite worker thread to that core),
//! `BENCH_METRICS` (the Prometheus recorder installed, as where `/metrics` is scraped),
//! `BENCH_MEMORY_ONLY` (only the memory figure, e.g. under a heap profiler), `BENCH_SERVE`
//! (`tokend`, `ceiling` or `ceiling-inactive`: only that server, for
//! `benches/callgrind.sh`).

// A benchmark that cannot set itself up should stop loudly, not limp on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use prost::Message as _;
use secrecy::ExposeSecret as _;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use tokend::App;
use tokend::config::Settings;
use tokend::proto::v1 as pb;
use tokend::proto::v1::token_service_client::TokenServiceClient;
use tokend::proto::v1::token_service_server::{TokenService, TokenServiceServer};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // cargo passes `--bench`; nothing else to parse.
    if std::env::var_os("TOKEND_BENCH_PINNED").is_none() {
        // Re-run pinned to core 0; h2load gets core 1.
        let status = Command::new("taskset")
            .args(["-c", "0"])
            .arg(std::env::current_exe()?)
            .args(std::env::args().skip(1))
            .env("TOKEND_BENCH_PINNED", "1")
            .status()
            .context("taskset (util-linux) is needed to pin the servers to one core")?;
        std::process::exit(status.code().unwrap_or(1));
    }
    Command::new("h2load")
        .arg("--version")
        .output()
        .context("h2load is needed: apt-get install nghttp2-client")?;
    // The log subscriber of `tokend serve` (text at info, on stderr), so that each call's
    // span costs here what it costs in production. `BENCH_NO_LOGS=1` leaves it out.
    let telemetry = match std::env::var_os("BENCH_NO_LOGS") {
        Some(_) => None,
        None => Some(tokend::telemetry::init(
            &Default::default(),
            &Default::default(),
        )?),
    };
    // From here on the main thread is a client; each server thread pins itself back.
    pin_to(CLIENT_CORE);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run());
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    result
}

/// A server on its own thread and current-thread runtime, like `tokend serve` with
/// `runtime.flavor = "current_thread"`.
struct ServerThread {
    addr: SocketAddr,
    /// The thread's id, whose CPU time is the server's cost.
    tid: i32,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        // Stop, but do not join: a graceful drain waits for clients this thread may still
        // hold open.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        drop(self.thread.take());
    }
}

/// Where h2load aims and whose CPU time it reads.
#[derive(Clone, Copy, Debug)]
struct Target {
    addr: SocketAddr,
    tid: i32,
}

impl ServerThread {
    fn target(&self) -> Target {
        Target {
            addr: self.addr,
            tid: self.tid,
        }
    }
}

/// The CPU time a thread of this process has used (nanoseconds, from the scheduler's own
/// accounting): unlike requests per second, it hardly moves when the shared machine's other
/// tenants take the core away, so the cost ratio to the ceiling is the steadier figure.
fn cpu_ns(tid: i32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))?;
    Ok(stat
        .split_whitespace()
        .next()
        .context("empty schedstat")?
        .parse()?)
}

/// The servers' core; h2load and the bench's own clients run on `CLIENT_CORE`.
const SERVER_CORE: usize = 0;
const CLIENT_CORE: usize = 1;

/// Pins the calling thread (and the threads it starts later) to `core`. The bench's own
/// clients (the IssueToken caller of (d), the flood of (e), the cold calls of (c)) run on
/// the client core beside h2load, so that the server core's time is the servers' work
/// alone, as it is when their callers are on other machines.
fn pin_to(core: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(core);
    rustix::thread::sched_setaffinity(None, &set).expect("sched_setaffinity");
}

fn this_tid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// CPU time (ns) of every thread of this process, summed by thread name: where the server
/// core's time went while IssueToken ran beside the load.
fn cpu_by_thread() -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let mut times = std::collections::BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        // A thread that ended between the listing and the read is simply left out.
        let (Ok(name), Ok(stat), Ok(status)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("schedstat")),
            std::fs::read_to_string(task.join("status")),
        ) else {
            continue;
        };
        // Numbered pool threads (`tokend-argon2-3`) count as one pool; the core tells the
        // servers' threads from the clients'.
        let name = name
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        let cores = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("?")
            .trim();
        let ns: u64 = stat.split_whitespace().next().unwrap_or("0").parse()?;
        *times.entry(format!("{name} (core {cores})")).or_default() += ns;
    }
    Ok(times)
}

/// What a running tokend exposes to the bench.
struct Tokend {
    server: ServerThread,
    lookups: Box<dyn Fn() -> u64 + Send>,
    verifications: Box<dyn Fn() -> u64 + Send>,
    cached_tokens: Box<dyn Fn() -> u64 + Send>,
    root: String,
}

fn start_tokend(settings: Settings) -> anyhow::Result<Tokend> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Named, so a profiler (`perf report --sort comm`) tells the servers apart.
    let thread = std::thread::Builder::new()
        .name("tokend".into())
        .spawn(move || {
            pin_to(SERVER_CORE);
            let tid = this_tid();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = App::build(&settings).await.unwrap();
                let root = tokend::service::bootstrap(&app.core())
                    .await
                    .unwrap()
                    .expose_secret()
                    .to_owned();
                let (store, hasher, cache) = (app.store(), app.hasher(), app.cache());
                ready_tx
                    .send((
                        app.local_addr(),
                        tid,
                        root,
                        Box::new(move || store.token_lookups()) as Box<dyn Fn() -> u64 + Send>,
                        Box::new(move || hasher.verifications()) as Box<dyn Fn() -> u64 + Send>,
                        Box::new(move || cache.token_entries()) as Box<dyn Fn() -> u64 + Send>,
                    ))
                    .unwrap();
                app.run_until(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
    let (addr, tid, root, lookups, verifications, cached_tokens) = ready_rx.recv()?;
    Ok(Tokend {
        server: ServerThread {
            addr,
            tid,
            stop: Some(stop_tx),
            thread: Some(thread?),
        },
        lookups,
        verifications,
        cached_tokens,
        root,
    })
}

/// The ceiling: a tonic server whose Introspect returns a fixed answer and does nothing.
struct Noop(pb::IntrospectResponse);

#[tonic::async_trait]
impl TokenService for Noop {
    async fn issue_token(
        &self,
        _: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    async fn list_tokens(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    async fn revoke_token(
        &self,
        _: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    async fn delete_token(
        &self,
        _: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    async fn introspect(
        &self,
        _: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        Ok(Response::new(self.0.clone()))
    }
    async fn revoke_tokens(
        &self,
        _: Request<pb::RevokeTokensRequest>,
    ) -> Result<Response<pb::RevokeTokensResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    async fn rotate_token(
        &self,
        _: Request<pb::RotateTokenRequest>,
    ) -> Result<Response<pb::RotateTokenResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
    async fn report_leaked_token(
        &self,
        _: Request<pb::ReportLeakedTokenRequest>,
    ) -> Result<Response<pb::ReportLeakedTokenResponse>, Status> {
        Err(Status::unimplemented("no-op"))
    }
}

fn start_noop(answer: pb::IntrospectResponse) -> anyhow::Result<ServerThread> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let name = if answer.active {
        "ceiling-active"
    } else {
        "ceiling-inactive"
    };
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            pin_to(SERVER_CORE);
            let tid = this_tid();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready_tx
                    .send((listener.local_addr().unwrap(), tid))
                    .unwrap();
                Server::builder()
                    .add_service(TokenServiceServer::new(Noop(answer)))
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener)
                            .with_nodelay(Some(true)),
                        async {
                            let _ = stop_rx.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
    let (addr, tid) = ready_rx.recv()?;
    Ok(ServerThread {
        addr,
        tid,
        stop: Some(stop_tx),
        thread: Some(thread?),
    })
}

async fn client(addr: SocketAddr) -> anyhow::Result<TokenServiceClient<Channel>> {
    Ok(TokenServiceClient::new(
        Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?,
    ))
}

fn authed<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// Latency figures of one run.
#[derive(Clone, Copy, Debug)]
struct Figures {
    rps: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    /// The server thread's CPU time per call.
    cpu: Duration,
}

fn figures(mut latencies: Vec<Duration>, wall: Duration, cpu: Duration) -> Figures {
    let cpu = cpu / latencies.len().max(1) as u32;
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    Figures {
        rps: latencies.len() as f64 / wall.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        cpu,
    }
}

/// An Introspect request for `token` as one gRPC message frame: h2load's request body.
fn introspect_body(token: &str) -> Vec<u8> {
    let message = pb::IntrospectRequest {
        token: token.into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    framed
}

/// What one or more h2load runs measured, before it is summed up as [`Figures`].
#[derive(Default)]
struct Sample {
    latencies: Vec<Duration>,
    wall: Duration,
    cpu: Duration,
}

impl Sample {
    fn add(&mut self, other: Sample) {
        self.latencies.extend(other.latencies);
        self.wall += other.wall;
        self.cpu += other.cpu;
    }

    fn figures(self) -> Figures {
        figures(self.latencies, self.wall, self.cpu)
    }
}

/// Runs h2load (on core 1) against Introspect with a fixed body, `BENCH_REQUESTS` calls.
fn h2load(target: Target, key: &str, token: &str) -> anyhow::Result<Figures> {
    Ok(h2load_sample(target, key, token, env_or("BENCH_REQUESTS", 200_000))?.figures())
}

/// tokend and its ceiling under the same load, taking turns in `BENCH_SLICES` slices of
/// `BENCH_REQUESTS` calls each in all, in the order tokend, ceiling, ceiling, tokend, …:
/// the machine's speed drifts within seconds (other tenants of the host), and turns this
/// short put both servers under the same drift, where one run after the other did not.
fn paired(
    tokend: Target,
    ceiling: Target,
    key: &str,
    token: &str,
) -> anyhow::Result<(Figures, Figures)> {
    let requests = env_or("BENCH_REQUESTS", 200_000);
    let slices = env_or("BENCH_SLICES", 10).clamp(1, requests);
    let (mut ours, mut theirs) = (Sample::default(), Sample::default());
    for slice in 0..slices {
        let calls = requests / slices + usize::from(slice < requests % slices);
        let tokend_first = slice % 2 == 0;
        for is_tokend in [tokend_first, !tokend_first] {
            let (target, sample) = if is_tokend {
                (tokend, &mut ours)
            } else {
                (ceiling, &mut theirs)
            };
            sample.add(h2load_sample(target, key, token, calls)?);
        }
    }
    Ok((ours.figures(), theirs.figures()))
}

/// One h2load run of `requests` calls; checks every response was HTTP 200.
fn h2load_sample(
    target: Target,
    key: &str,
    token: &str,
    requests: usize,
) -> anyhow::Result<Sample> {
    let concurrency = env_or("BENCH_CONCURRENCY", 64);
    let dir = tempfile::tempdir()?;
    let body_path = dir.path().join("body");
    let log_path = dir.path().join("log");
    std::fs::write(&body_path, introspect_body(token))?;
    let streams = 8.min(concurrency);
    let cpu_before = cpu_ns(target.tid)?;
    let output = Command::new("taskset")
        .args(["-c", &CLIENT_CORE.to_string(), "h2load"])
        .arg(format!("-n{requests}"))
        .arg(format!("-c{}", concurrency / streams))
        .arg(format!("-m{streams}"))
        .arg("-t1")
        .arg(format!("--log-file={}", log_path.display()))
        .arg(format!("-d{}", body_path.display()))
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", &format!("authorization: Bearer {key}")])
        .arg(format!(
            "http://{}/tokend.v1.TokenService/Introspect",
            target.addr
        ))
        .output()?;
    let cpu = Duration::from_nanos(cpu_ns(target.tid)? - cpu_before);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("h2load failed: {stdout}");
    }
    // "finished in 2.34s, 85470.09 req/s, …" (or "…ms", "…us")
    let wall = stdout
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(',').next())
        .and_then(|l| {
            let l = l.trim();
            [("us", 1e-6), ("ms", 1e-3), ("s", 1.0)]
                .iter()
                .find_map(|(unit, scale)| {
                    l.strip_suffix(unit)
                        .and_then(|n| n.parse::<f64>().ok())
                        .map(|n| n * scale)
                })
        })
        .context("h2load printed no duration")?;
    let log = std::fs::read_to_string(&log_path)?;
    let mut latencies = Vec::with_capacity(requests);
    for line in log.lines() {
        let mut columns = line.split('\t');
        let (_start, status, micros) = (columns.next(), columns.next(), columns.next());
        if status != Some("200") {
            bail!("a request got HTTP {status:?}");
        }
        latencies.push(Duration::from_micros(micros.context("latency")?.parse()?));
    }
    if latencies.len() != requests {
        bail!("{} of {requests} requests completed", latencies.len());
    }
    Ok(Sample {
        latencies,
        wall: Duration::from_secs_f64(wall),
        cpu,
    })
}

/// One tonic call at a time over `tokens`, each introspected once (cold): the latency of a
/// first sight, argon2 included.
async fn cold(
    target: Target,
    key: &str,
    tokens: &[String],
    expect_active: bool,
) -> anyhow::Result<Figures> {
    let client = client(target.addr).await?;
    let start = Instant::now();
    let cpu_before = cpu_ns(target.tid)?;
    let mut latencies = Vec::with_capacity(tokens.len());
    for chunk in tokens.chunks(1) {
        let calls = chunk.iter().map(|token| {
            let mut client = client.clone();
            let request = authed(
                pb::IntrospectRequest {
                    token: token.clone(),
                    ..Default::default()
                },
                key,
            );
            async move {
                let begun = Instant::now();
                let answer = client.introspect(request).await?.into_inner();
                anyhow::Ok((begun.elapsed(), answer.active))
            }
        });
        for result in futures::future::join_all(calls).await {
            let (took, active) = result?;
            if active != expect_active {
                bail!("a cold introspect answered active = {active}");
            }
            latencies.push(took);
        }
    }
    let cpu = Duration::from_nanos(cpu_ns(target.tid)? - cpu_before);
    Ok(figures(latencies, start.elapsed(), cpu))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Moves the embedded SQLite database's worker threads (sqlx names them `sqlx-sqlite-worker-N`)
/// to `core`: (d) with the server's database work off the server's core, as on a machine
/// with a second core for it, to show how much of (d) that work is. Moved back after (d).
fn move_sqlite_worker(core: usize) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(core);
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if name.starts_with("sqlx-sqlite-wor") {
            let tid: i32 = task
                .file_name()
                .and_then(|name| name.to_str())
                .context("a task without a numeric name")?
                .parse()?;
            let tid = rustix::process::Pid::from_raw(tid).context("task id 0")?;
            rustix::thread::sched_setaffinity(Some(tid), &set)?;
        }
    }
    Ok(())
}

/// What (d) measured.
struct Issuing {
    /// The slices with a token issued every 20 ms.
    loaded: Figures,
    /// The slices between them, without.
    quiet: Figures,
    /// Tokens issued.
    issued: u64,
    /// Each thread's CPU time over the loaded slices.
    cpu: std::collections::BTreeMap<String, u64>,
    /// The loaded slices' calls and time.
    loaded_calls: usize,
    loaded_seconds: f64,
}

/// (d): h2load on the warm token in `BENCH_SLICES` pairs of slices taking turns (quiet,
/// loaded, loaded, quiet, …), a client issuing a token every 20 ms during the loaded ones
/// only. The loaded slices are set against the quiet ones of the same run, so that both see
/// the same drift of the machine's speed, as (a) against its ceiling.
async fn while_issuing(
    tokend: &Tokend,
    api: &TokenServiceClient<Channel>,
    root: &str,
    warm: &str,
) -> anyhow::Result<Issuing> {
    if let Ok(core) = std::env::var("BENCH_SQLITE_WORKER_CORE") {
        move_sqlite_worker(
            core.parse()
                .context("BENCH_SQLITE_WORKER_CORE: a core number")?,
        )?;
    }
    let running = Arc::new(AtomicBool::new(true));
    let issuing = Arc::new(AtomicBool::new(false));
    // Held while a call is in flight, so that a quiet slice starts after the last one.
    let in_flight = Arc::new(tokio::sync::Mutex::new(()));
    let issuer = {
        let (running, issuing, in_flight) = (
            Arc::clone(&running),
            Arc::clone(&issuing),
            Arc::clone(&in_flight),
        );
        let mut api = api.clone();
        let root = root.to_owned();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                let _call = in_flight.lock().await;
                if !issuing.load(Ordering::Relaxed) {
                    continue;
                }
                let request = authed(
                    pb::IssueTokenRequest {
                        tenant_id: "acme".into(),
                        actor_user_id: "alice".into(),
                        kind: pb::TokenKind::Personal.into(),
                        name: format!("background-{}", uuid::Uuid::new_v4()),
                        ..Default::default()
                    },
                    &root,
                );
                if api.issue_token(request).await.is_ok() {
                    n += 1;
                }
            }
            n
        })
    };
    let requests = env_or("BENCH_REQUESTS", 200_000);
    let slices = env_or("BENCH_SLICES", 10).clamp(1, requests);
    let (mut loaded, mut quiet) = (Sample::default(), Sample::default());
    let mut cpu = std::collections::BTreeMap::<String, u64>::new();
    for slice in 0..slices {
        let calls = requests / slices + usize::from(slice < requests % slices);
        let loaded_first = slice % 2 == 1;
        for is_loaded in [loaded_first, !loaded_first] {
            issuing.store(is_loaded, Ordering::Relaxed);
            drop(in_flight.lock().await);
            let before = cpu_by_thread()?;
            let sample = tokio::task::spawn_blocking({
                let target = tokend.server.target();
                let (root, warm) = (root.to_owned(), warm.to_owned());
                move || h2load_sample(target, &root, &warm, calls)
            })
            .await??;
            if is_loaded {
                for (name, ns) in cpu_by_thread()? {
                    let spent = ns.saturating_sub(before.get(&name).copied().unwrap_or(0));
                    *cpu.entry(name).or_default() += spent;
                }
                loaded.add(sample);
            } else {
                quiet.add(sample);
            }
        }
    }
    issuing.store(false, Ordering::Relaxed);
    running.store(false, Ordering::Relaxed);
    if std::env::var_os("BENCH_SQLITE_WORKER_CORE").is_some() {
        move_sqlite_worker(SERVER_CORE)?;
    }
    let (loaded_calls, loaded_seconds) = (loaded.latencies.len(), loaded.wall.as_secs_f64());
    Ok(Issuing {
        loaded: loaded.figures(),
        quiet: quiet.figures(),
        issued: issuer.await?,
        cpu,
        loaded_calls,
        loaded_seconds,
    })
}

/// In-flight calls of the wrong-secret flood in (e).
const FLOOD_IN_FLIGHT: usize = 8;

/// (e): h2load on the warm token while `FLOOD_IN_FLIGHT` callers send `victim`'s public id
/// with a new wrong secret each time; returns the figures, the flood's calls, and whether
/// the victim still introspects active afterwards.
async fn while_flooded(
    tokend: &Tokend,
    api: &TokenServiceClient<Channel>,
    root: &str,
    warm: &str,
    victim: &str,
) -> anyhow::Result<(Figures, u64, f64, bool)> {
    let running = Arc::new(AtomicBool::new(true));
    let started = Instant::now();
    let display_len = victim.len() - 6 - 40 - 1;
    let format = tokend::domain::token_format::TokenFormat::new("tkd")?;
    let flooders: Vec<_> = (0..FLOOD_IN_FLIGHT)
        .map(|_| {
            let (running, mut api, root) = (Arc::clone(&running), api.clone(), root.to_owned());
            let (victim, format) = (victim.to_owned(), format.clone());
            tokio::spawn(async move {
                let mut calls = 0u64;
                while running.load(Ordering::Relaxed) {
                    let fresh = format.generate(tokend::domain::token_format::TokenKind::Personal);
                    let body = format!("{}_{}", &victim[..display_len], fresh.secret());
                    let forged = format!("{body}{}", checksum(&body));
                    let answer = api
                        .introspect(authed(
                            pb::IntrospectRequest {
                                token: forged,
                                ..Default::default()
                            },
                            &root,
                        ))
                        .await;
                    assert!(
                        !answer.is_ok_and(|a| a.into_inner().active),
                        "a forged secret passed"
                    );
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let loaded = tokio::task::spawn_blocking({
        let target = tokend.server.target();
        let root = root.to_owned();
        let warm = warm.to_owned();
        move || h2load(target, &root, &warm)
    })
    .await??;
    running.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let mut calls = 0;
    for flooder in flooders {
        calls += flooder.await?;
    }
    let still_active = api
        .clone()
        .introspect(authed(
            pb::IntrospectRequest {
                token: victim.to_owned(),
                ..Default::default()
            },
            root,
        ))
        .await?
        .into_inner()
        .active;
    Ok((loaded, calls, seconds, still_active))
}

fn print_row(name: &str, tokend: Figures, ceiling: Figures) {
    println!(
        "| {name} | {:.0} | {:.0} | {:.2}× | {:?} / {:?} / {:?} | {:?} / {:?} / {:?} | {:.2}× | {:.1} / {:.1} µs | {:.2}× |",
        tokend.rps,
        ceiling.rps,
        tokend.rps / ceiling.rps,
        tokend.p50,
        tokend.p99,
        tokend.p999,
        ceiling.p50,
        ceiling.p99,
        ceiling.p999,
        tokend.p99.as_secs_f64() / ceiling.p99.as_secs_f64(),
        tokend.cpu.as_secs_f64() * 1e6,
        ceiling.cpu.as_secs_f64() * 1e6,
        tokend.cpu.as_secs_f64() / ceiling.cpu.as_secs_f64(),
    );
}

fn settings(dir: &std::path::Path) -> Settings {
    let mut settings = Settings::load(None, Vec::new()).unwrap();
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings.database_url = format!("sqlite://{}?mode=rwc", dir.join("tokend.db").display()).into();
    if std::env::var_os("BENCH_METRICS").is_some() {
        // The Prometheus recorder installed and `/metrics` served, as where it is scraped.
        settings.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    }
    if let Ok(kib) = std::env::var("BENCH_ARGON2_KIB") {
        settings.argon2.memory_kib = kib.parse().expect("BENCH_ARGON2_KIB: KiB");
    }
    if let Ok(nice) = std::env::var("BENCH_ARGON2_NICE") {
        settings.argon2.nice = nice.parse().expect("BENCH_ARGON2_NICE: 0-19");
    }
    settings
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// With `BENCH_POSTGRES_URL` (a server URL ending in a database name), scenarios (a)–(d)
/// run against a fresh PostgreSQL database created beside it, so the database's work happens
/// in its own processes, as in a deployment, rather than on the server's core.
async fn database_for_run(
    dir: &std::path::Path,
) -> anyhow::Result<(Settings, &'static str, Option<(String, String)>)> {
    use sea_orm::ConnectionTrait as _;
    let mut settings = settings(dir);
    let Ok(admin_url) = std::env::var("BENCH_POSTGRES_URL") else {
        return Ok((
            settings,
            "SQLite (embedded; its worker thread shares the server's core)",
            None,
        ));
    };
    let name = format!("tokend_bench_{}", uuid::Uuid::new_v4().simple());
    let admin = sea_orm::Database::connect(&admin_url).await?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    admin.close().await?;
    let (server, _) = admin_url
        .rsplit_once('/')
        .context("BENCH_POSTGRES_URL: postgres://user@host:port/database")?;
    settings.database_url = format!("{server}/{name}").into();
    Ok((
        settings,
        "PostgreSQL (its processes not pinned)",
        Some((admin_url, name)),
    ))
}

async fn run() -> anyhow::Result<()> {
    if std::env::var_os("BENCH_MEMORY_ONLY").is_some() {
        return memory().await;
    }
    let dir = tempfile::tempdir()?;
    let (run_settings, database, postgres) = database_for_run(dir.path()).await?;
    let tokend = start_tokend(run_settings)?;
    let root = tokend.root.clone();
    let mut api = client(tokend.server.addr).await?;

    // A gateway key that may introspect, and a token for the warm runs.
    let directory = tokend::proto::v1::directory_service_client::DirectoryServiceClient::new(
        Channel::from_shared(format!("http://{}", tokend.server.addr))?
            .connect()
            .await?,
    );
    let mut directory = directory;
    directory
        .put_tenant(authed(
            pb::PutTenantRequest {
                tenant: Some(pb::Tenant {
                    id: "acme".into(),
                    ..Default::default()
                }),
            },
            &root,
        ))
        .await?;
    directory
        .put_role(authed(
            pb::PutRoleRequest {
                tenant_id: "acme".into(),
                name: "dev".into(),
                permissions: vec!["entities:read".into(), "entities:write".into()],
            },
            &root,
        ))
        .await?;
    directory
        .put_member(authed(
            pb::PutMemberRequest {
                tenant_id: "acme".into(),
                user_id: "alice".into(),
                role: "dev".into(),
                groups: vec!["eng".into()],
            },
            &root,
        ))
        .await?;
    let issue = |name: String| {
        authed(
            pb::IssueTokenRequest {
                tenant_id: "acme".into(),
                actor_user_id: "alice".into(),
                kind: pb::TokenKind::Personal.into(),
                name,
                ..Default::default()
            },
            &root,
        )
    };
    let warm = api
        .issue_token(issue("warm".into()))
        .await?
        .into_inner()
        .secret;
    let answer = api
        .introspect(authed(
            pb::IntrospectRequest {
                token: warm.clone(),
                ..Default::default()
            },
            &root,
        ))
        .await?
        .into_inner();
    assert!(answer.active);

    if let Ok(which) = std::env::var("BENCH_SERVE") {
        return serve_only(&which, &tokend, answer, &root, &warm).await;
    }

    println!("Introspect over gRPC, servers on core 0 (current-thread runtime), h2load on core 1,");
    println!("database: {database},");
    println!(
        "{} in-flight calls, {} requests per run. Ceiling: a no-op tonic server with the same answer.\n",
        env_or("BENCH_CONCURRENCY", 64),
        env_or("BENCH_REQUESTS", 200_000)
    );
    println!(
        "| scenario | tokend rps | ceiling rps | rps ratio | tokend p50 / p99 / p99.9 | ceiling p50 / p99 / p99.9 | p99 ratio | server CPU per call, tokend / ceiling | CPU ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");

    let noop_active = start_noop(answer.clone())?;
    let noop_inactive = start_noop(pb::IntrospectResponse::default())?;

    // The machine is shared and its speed drifts within seconds (the ceiling alone has
    // moved by 1.5× from one run to the next), so (a) and (b) take turns with their ceiling
    // in short slices, every scenario runs in several rounds, and the ratios are reported
    // per round and as the median.
    let rounds = env_or("BENCH_ROUNDS", 3);
    let requests = env_or("BENCH_REQUESTS", 200_000) as u64;
    let (mut warm_runs, mut garbage_runs, mut loaded_runs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut lookups, mut verifications, mut issued) = (0, 0, 0);
    let mut issuing_cpu = std::collections::BTreeMap::<String, u64>::new();
    // The (d) runs' loaded slices against the round's separate (a) run; their time; and
    // what the server thread would have spent on their calls without IssueToken.
    let mut loaded_apart = Vec::new();
    let (mut issuing_seconds, mut serving_ns) = (0.0_f64, 0.0_f64);
    let (mut flooded_runs, mut flood_calls, mut flood_secs) = (Vec::new(), 0, 0.0);
    let victim = api
        .issue_token(issue("flooded".into()))
        .await?
        .into_inner()
        .secret;
    for round in 1..=rounds {
        // (a) warm valid token; queries and argon2 calls counted over the tokend slices
        // (the ceiling's never reach tokend).
        let (l0, v0) = ((tokend.lookups)(), (tokend.verifications)());
        let (run, ceiling) = paired(tokend.server.target(), noop_active.target(), &root, &warm)?;
        lookups += (tokend.lookups)() - l0;
        verifications += (tokend.verifications)() - v0;
        print_row(&format!("(a) warm valid, round {round}"), run, ceiling);
        warm_runs.push((run, ceiling));

        // (b) garbage.
        let (run, ceiling) = paired(
            tokend.server.target(),
            noop_inactive.target(),
            &root,
            "garbage",
        )?;
        print_row(&format!("(b) garbage, round {round}"), run, ceiling);
        garbage_runs.push((run, ceiling));

        // (d) warm while IssueToken runs at 50/s, in slices taking turns with quiet ones;
        // the row is beside this round's (a) ceiling.
        let run = while_issuing(&tokend, &api, &root, &warm).await?;
        issued += run.issued;
        issuing_seconds += run.loaded_seconds;
        for (name, ns) in run.cpu {
            *issuing_cpu.entry(name).or_default() += ns;
        }
        // The server thread's share is what it spent beyond serving the same calls quietly.
        serving_ns += run.quiet.cpu.as_nanos() as f64 * run.loaded_calls as f64;
        print_row(
            &format!("(d) warm, IssueToken at 50/s, round {round}"),
            run.loaded,
            warm_runs[round - 1].1,
        );
        print_row(
            &format!("(d) its quiet slices, round {round}"),
            run.quiet,
            warm_runs[round - 1].1,
        );
        loaded_runs.push((run.loaded, run.quiet));
        loaded_apart.push((run.loaded, warm_runs[round - 1].0));

        // (e) warm while another token's id is flooded with wrong secrets.
        let (run, calls, seconds, victim_active) =
            while_flooded(&tokend, &api, &root, &warm, &victim).await?;
        anyhow::ensure!(victim_active, "the flooded token was locked out");
        flood_calls += calls;
        flood_secs += seconds;
        print_row(
            &format!("(e) warm, wrong-secret flood, round {round}"),
            run,
            warm_runs[round - 1].1,
        );
        flooded_runs.push((run, warm_runs[round - 1].0));
    }

    // (c) cold valid tokens: first sight, one argon2 verification each.
    let count = env_or("BENCH_COLD", 300);
    let mut cold_tokens = Vec::with_capacity(count);
    for i in 0..count {
        cold_tokens.push(
            api.issue_token(issue(format!("cold-{i}")))
                .await?
                .into_inner()
                .secret,
        );
    }
    let ceiling_cold = cold(noop_active.target(), &root, &cold_tokens, true).await?;
    let cold_run = cold(tokend.server.target(), &root, &cold_tokens, true).await?;
    print_row(
        "(c) cold valid (tonic client, 1 in flight)",
        cold_run,
        ceiling_cold,
    );

    println!();
    println!("Medians over {rounds} rounds:");
    let rps = |pairs: &[(Figures, Figures)]| median(pairs.iter().map(|(a, b)| a.rps / b.rps));
    let cpu = |pairs: &[(Figures, Figures)]| {
        median(
            pairs
                .iter()
                .map(|(a, b)| a.cpu.as_secs_f64() / b.cpu.as_secs_f64()),
        )
    };
    let p99 = |pairs: &[(Figures, Figures)]| {
        median(
            pairs
                .iter()
                .map(|(a, b)| a.p99.as_secs_f64() / b.p99.as_secs_f64()),
        )
    };
    println!(
        "- (a) warm: {:.2}× ceiling rps, {:.2}× ceiling p99, {:.2}× ceiling CPU per call",
        rps(&warm_runs),
        p99(&warm_runs),
        cpu(&warm_runs)
    );
    println!(
        "- (b) garbage: {:.2}× ceiling rps, {:.2}× ceiling p99, {:.2}× ceiling CPU per call",
        rps(&garbage_runs),
        p99(&garbage_runs),
        cpu(&garbage_runs)
    );
    println!(
        "- (d) p99 / (a) p99, loaded slices against the quiet ones between them: {:.2}× ({issued} tokens issued, {:.1}/s over the loaded slices)",
        p99(&loaded_runs),
        issued as f64 / issuing_seconds.max(1e-9)
    );
    println!(
        "  against the round's separate (a) run instead: {:.2}×",
        p99(&loaded_apart)
    );
    let per_token = |ns: f64| ns / 1e3 / issued.max(1) as f64;
    let mut spent: Vec<String> = Vec::new();
    for (name, ns) in &issuing_cpu {
        let ns = if name.starts_with("tokend (") {
            *ns as f64 - serving_ns
        } else {
            *ns as f64
        };
        if ns.abs() >= 1e6 {
            spent.push(format!("{name} {:.0} µs", per_token(ns)));
        }
    }
    println!(
        "  CPU per issued token by thread (all of a thread's time in the loaded slices, the tokend thread's beyond what the quiet slices took per call): {}",
        spent.join(", ")
    );
    if let Ok(core) = std::env::var("BENCH_SQLITE_WORKER_CORE") {
        println!("  (BENCH_SQLITE_WORKER_CORE: the SQLite worker ran on core {core} during (d))");
    }
    println!(
        "- (e) p99 / (a) p99 of the same round: {:.2}× ({:.0} wrong secrets/s for one real id, {FLOOD_IN_FLIGHT} in flight; the real token still active after each run)",
        p99(&flooded_runs),
        flood_calls as f64 / flood_secs
    );
    println!(
        "- (c) cold p50: {:?} (p99 {:?})",
        cold_run.p50, cold_run.p99
    );
    let calls = requests as f64 * rounds as f64;
    println!(
        "warm path: {} database queries and {} argon2 verifications per Introspect",
        lookups as f64 / calls,
        verifications as f64 / calls
    );
    println!("cached tokens after the runs: {}", (tokend.cached_tokens)());
    drop(noop_active);
    drop(noop_inactive);
    drop(tokend);
    if let Some((admin_url, name)) = postgres {
        use sea_orm::ConnectionTrait as _;
        let admin = sea_orm::Database::connect(&admin_url).await?;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await?;
        admin.close().await?;
    }

    memory().await
}

/// `BENCH_SERVE=tokend|ceiling|ceiling-inactive`: only that server, driven from outside (by
/// `benches/callgrind.sh`, which counts its instructions per call: a figure the machine's
/// other tenants cannot move). `ceiling-inactive` answers `active = false`, as the ceiling
/// of the garbage runs does. Prints the address, the caller's key and a file holding an
/// Introspect body for the warm token, then serves until stdin closes.
async fn serve_only(
    which: &str,
    tokend: &Tokend,
    answer: pb::IntrospectResponse,
    root: &str,
    warm: &str,
) -> anyhow::Result<()> {
    let ceiling;
    let target = match which {
        "tokend" => tokend.server.target(),
        "ceiling" => {
            ceiling = start_noop(answer)?;
            ceiling.target()
        }
        "ceiling-inactive" => {
            ceiling = start_noop(pb::IntrospectResponse::default())?;
            ceiling.target()
        }
        other => bail!("BENCH_SERVE: tokend, ceiling or ceiling-inactive, not {other:?}"),
    };
    let body = tempfile::NamedTempFile::new()?;
    std::fs::write(body.path(), introspect_body(warm))?;
    println!("{} {root} {}", target.addr, body.path().display());
    tokio::task::spawn_blocking(|| {
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
    })
    .await??;
    Ok(())
}

/// RSS growth from caching 100k tokens (live state and verified secret), per token.
async fn memory() -> anyhow::Result<()> {
    use sea_orm::{ActiveValue::Set, Database, EntityTrait as _, TransactionTrait as _};
    use tokend::storage::entities::tokens;

    const TOKENS: usize = 100_000;
    let dir = tempfile::tempdir()?;
    let mut settings = settings(dir.path());
    // Cheap argon2 so that verifying 100k distinct strings takes seconds, not minutes; the
    // cache entries are the same size whatever the cost.
    settings.argon2.memory_kib = 8;
    let tokend = start_tokend(settings.clone())?;
    let root = tokend.root.clone();
    let addr = tokend.server.addr;
    let mut directory = tokend::proto::v1::directory_service_client::DirectoryServiceClient::new(
        Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?,
    );
    directory
        .put_tenant(authed(
            pb::PutTenantRequest {
                tenant: Some(pb::Tenant {
                    id: "acme".into(),
                    ..Default::default()
                }),
            },
            &root,
        ))
        .await?;
    directory
        .put_role(authed(
            pb::PutRoleRequest {
                tenant_id: "acme".into(),
                name: "robot".into(),
                permissions: vec!["entities:read".into()],
            },
            &root,
        ))
        .await?;

    // 100k API keys sharing one secret (and so one hash), inserted in one transaction.
    let secret: String = "S".repeat(43);
    let hasher = tokend::hashing::Argon2Hasher::new(&settings.argon2, None)?;
    let hash = tokend::domain::ports::SecretHasher::hash(&hasher, secret.clone().into()).await?;
    let db = Database::connect(settings.database_url.expose_secret()).await?;
    let txn = db.begin().await?;
    let mut strings = Vec::with_capacity(TOKENS);
    for chunk in (0..TOKENS).collect::<Vec<_>>().chunks(500) {
        let rows = chunk
            .iter()
            .map(|i| {
                let id = format!("{i:012}");
                let body = format!("tkd_key_{id}_{secret}");
                strings.push(format!("{body}{}", checksum(&body)));
                tokens::ActiveModel {
                    id: Set(id.clone()),
                    tenant_id: Set("acme".into()),
                    kind: Set("key".into()),
                    name: Set(format!("robot-{i}")),
                    name_key: Set(format!("robot-{i}")),
                    owner_user_id: Set(None),
                    role_name: Set(Some("robot".into())),
                    scopes: Set(None),
                    secret_hash: Set(hash.clone()),
                    created_at: Set(0),
                    created_by: Set("bench".into()),
                    expires_at: Set(None),
                    last_used_at: Set(None),
                    revoked_at: Set(None),
                    revoked_by: Set(None),
                    revoke_reason: Set(None),
                    revocation_scheduled: Set(false),
                }
            })
            .collect::<Vec<_>>();
        tokens::Entity::insert_many(rows).exec(&txn).await?;
    }
    txn.commit().await?;
    db.close().await?;

    // RSS is read before, half-way and after: the second half's growth is the marginal cost
    // of a cached token, without the one-time costs (allocator arenas, cache tables, the
    // database's page cache, connection buffers) that the first calls pay.
    let before = rss_kib();
    let mut halfway = None;
    let api = client(addr).await?;
    for (i, chunk) in strings.chunks(64).enumerate() {
        if halfway.is_none() && i * 64 >= TOKENS / 2 {
            halfway = Some((rss_kib(), (tokend.cached_tokens)()));
        }
        let calls = chunk.iter().map(|token| {
            let mut api = api.clone();
            let request = authed(
                pb::IntrospectRequest {
                    token: token.clone(),
                    ..Default::default()
                },
                &root,
            );
            async move { api.introspect(request).await }
        });
        for answer in futures::future::join_all(calls).await {
            if !answer?.into_inner().active {
                bail!("a seeded token was not active");
            }
        }
    }
    let after = rss_kib();
    let cached = (tokend.cached_tokens)();
    let per_token = |kib: u64, tokens: u64| (kib as f64 * 1024.0) / tokens.max(1) as f64;
    println!(
        "memory: RSS grew by {} KiB for {cached} cached tokens: {:.0} bytes per cached token (live state + verified secret)",
        after.saturating_sub(before),
        per_token(after.saturating_sub(before), cached)
    );
    if let Some((rss, tokens)) = halfway {
        println!(
            "memory, second half only: {:.0} bytes per cached token ({} KiB for {} more tokens)",
            per_token(after.saturating_sub(rss), cached - tokens),
            after.saturating_sub(rss),
            cached - tokens
        );
    }
    Ok(())
}

fn checksum(body: &str) -> String {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut crc = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    String::from_utf8(out.to_vec()).unwrap()
}
