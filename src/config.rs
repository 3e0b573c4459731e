//! Typed, layered settings: built-in defaults, then an optional TOML file, then `TOKEND_*`
//! environment variables (`__` separates levels: `TOKEND_ARGON2__MEMORY_KIB=8192`).
//! The environment is passed in, so tests never touch the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

use crate::hashing::Argon2Settings;
use crate::introspect::cache::CacheSettings;
use crate::storage::DatabaseOptions;

/// Everything `tokend serve` can be told.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where to listen for gRPC.
    pub listen: SocketAddr,
    /// `sqlite://tokend.db?mode=rwc` (default) or `postgres://user@host/db`. May hold a
    /// password, so it is a secret.
    pub database_url: SecretString,
    /// Apply migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// The product prefix of token strings.
    pub token_prefix: String,
    /// Server-side pepper for argon2 (its secret input). Prefer `pepper_file`.
    pub pepper: Option<SecretString>,
    /// A file holding the pepper (a mounted Kubernetes Secret, say); surrounding white
    /// space is trimmed.
    pub pepper_file: Option<PathBuf>,
    /// argon2id cost parameters.
    pub argon2: Argon2Settings,
    /// Database pool.
    pub database: DatabaseSettings,
    /// The async runtime.
    pub runtime: RuntimeSettings,
    /// Logging.
    pub log: LogSettings,
    /// The Introspect caches.
    pub cache: CacheSettings,
    /// How often noted token uses are written to `last_used_at`, milliseconds.
    pub last_used_flush_ms: u64,
    /// After SIGTERM, how long in-flight calls may run before the connections are closed,
    /// milliseconds. Keep it below the orchestrator's grace period (Kubernetes: 30 s).
    pub drain_timeout_ms: u64,
    /// A second, plaintext port serving only gRPC health: kubelet's gRPC probes cannot speak
    /// TLS, so a TLS deployment points them here.
    pub health_listen: Option<SocketAddr>,
    /// The Prometheus endpoint.
    pub metrics: MetricsSettings,
    /// OpenTelemetry traces.
    pub otel: OtelSettings,
    /// TLS on the gRPC port.
    pub tls: TlsSettings,
    /// `TOKEND_*` variables that name no setting (possibly typos), for a warning.
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

/// Database pool settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Pooled connections (PostgreSQL).
    pub max_connections: u32,
    /// How long a request waits for a connection before it is answered UNAVAILABLE.
    pub acquire_timeout_ms: u64,
    /// How long Introspect waits for its read of a token's live state before answering
    /// UNAVAILABLE.
    pub state_read_timeout_ms: u64,
    /// SQLite: whether IssueToken waits for the disk (`fsync`) before it answers. Off by
    /// default: an issue lost to a power cut or kernel crash only denies a token never
    /// used before; every write that takes access away always waits for the disk.
    pub sqlite_durable_issue: bool,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        let defaults = DatabaseOptions::default();
        Self {
            max_connections: defaults.max_connections,
            acquire_timeout_ms: defaults.acquire_timeout.as_millis() as u64,
            state_read_timeout_ms: defaults.state_read_timeout.as_millis() as u64,
            sqlite_durable_issue: defaults.sqlite_durable_issue,
        }
    }
}

impl DatabaseSettings {
    /// As the store wants them.
    pub fn options(&self) -> DatabaseOptions {
        DatabaseOptions {
            max_connections: self.max_connections.max(1),
            acquire_timeout: Duration::from_millis(self.acquire_timeout_ms),
            state_read_timeout: Duration::from_millis(self.state_read_timeout_ms.max(1)),
            sqlite_durable_issue: self.sqlite_durable_issue,
        }
    }
}

/// Which tokio runtime serves requests.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeFlavor {
    /// One thread: fewest syscalls per response; run one replica per core.
    CurrentThread,
    /// A worker per core.
    #[default]
    MultiThread,
}

/// Runtime settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    /// `multi_thread` (default) or `current_thread`.
    pub flavor: RuntimeFlavor,
    /// Worker threads for `multi_thread`; 0 = one per core.
    pub worker_threads: usize,
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The Prometheus endpoint.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Where `GET /metrics` answers in the Prometheus text format; off when unset.
    pub listen: Option<SocketAddr>,
}

/// OpenTelemetry trace export (OTLP over gRPC).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtelSettings {
    /// The collector, `http://collector:4317` (plaintext); no traces are exported when
    /// unset.
    pub endpoint: Option<String>,
    /// The share of new traces kept, 0 to 1. A caller's sampling decision (in its
    /// `traceparent`) wins, so a trace is never cut in half.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for OtelSettings {
    fn default() -> Self {
        Self {
            endpoint: None,
            sample_ratio: 1.0,
            service_name: "tokend".to_owned(),
        }
    }
}

/// TLS on the gRPC port (rustls). Off unless both `cert_file` and `key_file` are set.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// The server's certificate chain, PEM.
    pub cert_file: Option<PathBuf>,
    /// Its private key, PEM.
    pub key_file: Option<PathBuf>,
    /// CAs that sign client certificates, PEM. When set, callers must present a certificate
    /// signed by one of them (mutual TLS), and its subject is recorded in audit events.
    pub client_ca_file: Option<PathBuf>,
    /// Accept callers without a client certificate too (a migration step towards mTLS).
    pub client_auth_optional: bool,
}

/// Logging settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// Text or JSON.
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `tokend=debug`); `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            database_url: SecretString::from("sqlite://tokend.db?mode=rwc"),
            migrate_on_start: true,
            token_prefix: "tkd".to_owned(),
            pepper: None,
            pepper_file: None,
            argon2: Argon2Settings::default(),
            database: DatabaseSettings::default(),
            runtime: RuntimeSettings::default(),
            log: LogSettings::default(),
            cache: CacheSettings::default(),
            last_used_flush_ms: 5000,
            drain_timeout_ms: 25_000,
            health_listen: None,
            metrics: MetricsSettings::default(),
            otel: OtelSettings::default(),
            tls: TlsSettings::default(),
            ignored_env: Vec::new(),
        }
    }
}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or the environment did not parse into [`Settings`].
    #[error("invalid configuration: {0}")]
    Invalid(#[from] config::ConfigError),
    /// The pepper file could not be read.
    #[error("cannot read pepper_file {path}: {source}")]
    PepperFile {
        /// The configured path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Both `pepper` and `pepper_file` were set.
    #[error("set at most one of pepper and pepper_file")]
    TwoPeppers,
    /// Settings that parse but cannot work together.
    #[error("invalid configuration: {0}")]
    Conflict(&'static str),
}

/// The top-level settings keys. `TOKEND_*` variables naming anything else belong to other
/// tools (the CLI's `TOKEND_TOKEN`, a CI script's own variables) and are left alone rather
/// than refused; `Settings::ignored_env` lists them so `serve` can warn about typos.
const KEYS: [&str; 17] = [
    "listen",
    "database_url",
    "migrate_on_start",
    "token_prefix",
    "pepper",
    "pepper_file",
    "argon2",
    "database",
    "runtime",
    "log",
    "cache",
    "last_used_flush_ms",
    "drain_timeout_ms",
    "health_listen",
    "metrics",
    "otel",
    "tls",
];

/// Variables the client subcommands read (`tokend token …`), set in operators' shells.
const CLIENT_ENV: [&str; 5] = [
    "TOKEND_TOKEN",
    "TOKEND_SERVER",
    "TOKEND_CA_FILE",
    "TOKEND_CLIENT_CERT_FILE",
    "TOKEND_CLIENT_KEY_FILE",
];

impl Settings {
    /// Defaults, overlaid by `file` (TOML) if given, overlaid by the `TOKEND_*` entries of
    /// `env`. An unknown key in the file is an error; an unknown `TOKEND_*` variable is
    /// ignored and listed in `ignored_env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut ignored_env = Vec::new();
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(name, _)| {
                let Some(rest) = name.strip_prefix("TOKEND_") else {
                    return false;
                };
                let top = rest.split("__").next().unwrap_or_default().to_lowercase();
                let known = KEYS.contains(&top.as_str());
                // The operator CLI's own variables: no typo to warn about.
                if !known && !CLIENT_ENV.contains(&name.as_str()) {
                    ignored_env.push(name.clone());
                }
                known
            })
            .collect();
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("TOKEND")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env.into_iter().collect())),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        ignored_env.sort();
        settings.ignored_env = ignored_env;
        settings.check()?;
        Ok(settings)
    }

    /// Combinations that would otherwise fail late, or quietly serve less than asked.
    fn check(&self) -> Result<(), ConfigError> {
        let tls = &self.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(ConfigError::Conflict(
                "tls.cert_file and tls.key_file: set both or neither",
            ));
        }
        if tls.client_ca_file.is_some() && tls.cert_file.is_none() {
            return Err(ConfigError::Conflict(
                "tls.client_ca_file needs tls.cert_file and tls.key_file",
            ));
        }
        if tls.client_auth_optional && tls.client_ca_file.is_none() {
            return Err(ConfigError::Conflict(
                "tls.client_auth_optional needs tls.client_ca_file",
            ));
        }
        if !(0.0..=1.0).contains(&self.otel.sample_ratio) {
            return Err(ConfigError::Conflict(
                "otel.sample_ratio must be between 0 and 1",
            ));
        }
        if self
            .otel
            .endpoint
            .as_deref()
            .is_some_and(|e| !e.starts_with("http://"))
        {
            // The exporter has no TLS stack of its own: a collector beside the pod (or a
            // mesh sidecar) is the usual hop, and https would fail only at export time.
            return Err(ConfigError::Conflict(
                "otel.endpoint must be an http:// URL (plaintext OTLP/gRPC to a nearby collector)",
            ));
        }
        Ok(())
    }

    /// The pepper from `pepper` or `pepper_file`, if either is set.
    pub fn resolve_pepper(&self) -> Result<Option<SecretString>, ConfigError> {
        match (&self.pepper, &self.pepper_file) {
            (Some(_), Some(_)) => Err(ConfigError::TwoPeppers),
            (Some(pepper), None) => Ok(Some(pepper.clone())),
            (None, Some(path)) => {
                let raw =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::PepperFile {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Some(SecretString::from(raw.trim().to_owned())))
            }
            (None, None) => Ok(None),
        }
    }

    /// The database URL, for the one place that connects.
    pub fn database_url(&self) -> &str {
        self.database_url.expose_secret()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_no_setup() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(s.database_url(), "sqlite://tokend.db?mode=rwc");
        assert!(s.migrate_on_start);
        assert_eq!(s.argon2, Argon2Settings::default());
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_defaults() {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        writeln!(
            file,
            "listen = \"0.0.0.0:6000\"\ntoken_prefix = \"acme\"\n[argon2]\nmemory_kib = 8192"
        )
        .unwrap();
        let s = Settings::load(
            Some(file.path()),
            env(&[
                ("TOKEND_LISTEN", "127.0.0.1:7000"),
                ("TOKEND_ARGON2__ITERATIONS", "2"),
                ("TOKEND_RUNTIME__FLAVOR", "current_thread"),
                ("TOKEND_TOKEN", "not a setting"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(s.token_prefix, "acme");
        assert_eq!(s.argon2.memory_kib, 8192);
        assert_eq!(s.argon2.iterations, 2);
        assert_eq!(s.runtime.flavor, RuntimeFlavor::CurrentThread);
    }

    #[test]
    fn the_pepper_comes_from_a_file_and_is_never_printed() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "  pepper-from-file  ").unwrap();
        let s = Settings::load(
            None,
            env(&[("TOKEND_PEPPER_FILE", file.path().to_str().unwrap())]),
        )
        .unwrap();
        let pepper = s.resolve_pepper().unwrap().unwrap();
        assert_eq!(pepper.expose_secret(), "pepper-from-file");
        assert!(!format!("{s:?}").contains("pepper-from-file"));

        let both = Settings::load(
            None,
            env(&[
                ("TOKEND_PEPPER", "x"),
                ("TOKEND_PEPPER_FILE", "/nonexistent"),
            ]),
        )
        .unwrap();
        assert!(matches!(
            both.resolve_pepper(),
            Err(ConfigError::TwoPeppers)
        ));
    }

    #[test]
    fn a_misspelled_file_key_is_refused_and_a_stray_variable_is_listed() {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        writeln!(file, "lisen = \"127.0.0.1:1\"").unwrap();
        let err = Settings::load(Some(file.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");

        let s = Settings::load(
            None,
            env(&[
                ("TOKEND_LISEN", "127.0.0.1:1"),
                ("TOKEND_TOKEN", "cli credential"),
                ("TOKEND_SERVER", "http://tokend:50051"),
            ]),
        )
        .unwrap();
        // The CLI's own variables are expected in an operator's shell: no typo warning.
        assert_eq!(s.ignored_env, vec!["TOKEND_LISEN"]);
        assert_eq!(s.listen.to_string(), "127.0.0.1:50051");
    }

    #[test]
    fn settings_that_cannot_work_together_are_refused_naming_the_keys() {
        for (pairs, named) in [
            (vec![("TOKEND_TLS__CERT_FILE", "c.pem")], "tls.key_file"),
            (
                vec![("TOKEND_TLS__CLIENT_CA_FILE", "ca.pem")],
                "tls.client_ca_file",
            ),
            (
                vec![
                    ("TOKEND_TLS__CERT_FILE", "c.pem"),
                    ("TOKEND_TLS__KEY_FILE", "k.pem"),
                    ("TOKEND_TLS__CLIENT_AUTH_OPTIONAL", "true"),
                ],
                "tls.client_auth_optional",
            ),
            (
                vec![("TOKEND_OTEL__SAMPLE_RATIO", "1.5")],
                "otel.sample_ratio",
            ),
            (
                vec![("TOKEND_OTEL__ENDPOINT", "collector:4317")],
                "otel.endpoint",
            ),
            (
                vec![("TOKEND_OTEL__ENDPOINT", "https://collector:4317")],
                "otel.endpoint",
            ),
        ] {
            let err = Settings::load(None, env(&pairs)).unwrap_err();
            assert!(err.to_string().contains(named), "{pairs:?}: {err}");
        }
        let s = Settings::load(
            None,
            env(&[
                ("TOKEND_METRICS__LISTEN", "127.0.0.1:9090"),
                ("TOKEND_OTEL__ENDPOINT", "http://collector:4317"),
                ("TOKEND_OTEL__SAMPLE_RATIO", "0.25"),
                ("TOKEND_HEALTH_LISTEN", "127.0.0.1:50052"),
            ]),
        )
        .unwrap();
        assert_eq!(s.metrics.listen.unwrap().port(), 9090);
        assert_eq!(s.otel.sample_ratio, 0.25);
        assert_eq!(s.health_listen.unwrap().port(), 50052);
        assert!(s.ignored_env.is_empty());
    }

    #[test]
    fn nonsense_is_refused_with_the_key_named() {
        let err = Settings::load(None, env(&[("TOKEND_LISTEN", "not-an-address")])).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }
}
