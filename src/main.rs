//! The `tokend` binary: parses the command line, loads settings, starts the runtime and
//! hands over to the library. Wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrecy::ExposeSecret as _;

use tokend::App;
use tokend::cli;
use tokend::config::{RuntimeFlavor, Settings};
use tokend::domain::Error;

/// Issues, lists, revokes and introspects access tokens over gRPC.
#[derive(Debug, Parser)]
#[command(name = "tokend", version, about)]
struct Cli {
    /// A TOML settings file; `TOKEND_*` environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    connection: cli::Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC on TOKEND_LISTEN (default 127.0.0.1:50051) until SIGTERM or Ctrl-C.
    Serve {
        /// Do not apply migrations on start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Create the system tenant, its admin role and the root API key, printed alone on the
    /// last line of stdout. Refuses on a database that is already bootstrapped.
    Bootstrap,
    /// Issue, list, revoke, delete or rotate tokens on --server (credential: TOKEND_TOKEN).
    #[command(subcommand)]
    Token(cli::TokenCommand),
    /// Introspect the token string read from stdin, on --server.
    Introspect(cli::IntrospectArgs),
    /// Tenants, roles, members and users on --server.
    #[command(subcommand)]
    Directory(cli::DirectoryCommand),
    /// The audit log on --server, newest first.
    Audit(cli::AuditArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Client subcommands talk to a server: no settings, database or logging of their own.
    let client = match cli.command {
        Command::Token(command) => cli::ClientCommand::Token(command),
        Command::Introspect(args) => cli::ClientCommand::Introspect(args),
        Command::Directory(command) => cli::ClientCommand::Directory(command),
        Command::Audit(args) => cli::ClientCommand::Audit(args),
        command => return serve_side(cli.config, command),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tokend: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(&cli.connection, client)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tokend: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `serve`, `migrate` and `bootstrap`: the commands that run against the database.
fn serve_side(config: Option<PathBuf>, command: Command) -> ExitCode {
    let cli = ServeSide { config, command };
    let mut settings = match Settings::load(cli.config.as_deref(), std::env::vars()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("tokend: {err}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match tokend::telemetry::init(&settings.log, &settings.otel) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("tokend: {err:#}");
            return ExitCode::from(2);
        }
    };
    for name in &settings.ignored_env {
        tracing::warn!(variable = %name, "ignoring a TOKEND_ variable that names no setting");
    }

    let runtime = match build_runtime(&settings) {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tokend: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { no_migrate } => {
                if no_migrate {
                    settings.migrate_on_start = false;
                }
                // Listening for SIGTERM from the start: as a container's PID 1, tokend would
                // otherwise ignore it during a long migration on start.
                let stop = shutdown_signal();
                tokio::pin!(stop);
                let app = tokio::select! {
                    app = App::build(&settings) => app?,
                    () = &mut stop => {
                        tracing::info!("stopped before serving");
                        return Ok(());
                    }
                };
                app.run_until(stop).await
            }
            Command::Migrate => {
                let stop = shutdown_signal();
                tokio::select! {
                    migrated = tokend::app::migrate(&settings) => migrated?,
                    // A migration runs in one transaction per step: stopping is safe.
                    () = stop => anyhow::bail!("stopped before the migrations were applied"),
                }
                println!("migrations applied");
                Ok(())
            }
            Command::Bootstrap => bootstrap(&settings).await,
            Command::Token(_)
            | Command::Introspect(_)
            | Command::Directory(_)
            | Command::Audit(_) => {
                unreachable!("client subcommands are run by main")
            }
        }
    });
    // Outside the runtime: the last spans are exported on the exporter's own threads.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tokend: {err:#}");
            ExitCode::FAILURE
        }
    }
}

struct ServeSide {
    config: Option<PathBuf>,
    command: Command,
}

async fn bootstrap(settings: &Settings) -> anyhow::Result<()> {
    match tokend::app::bootstrap(settings).await {
        Ok(root) => {
            println!("Bootstrapped the system tenant with an admin role and a root API key.");
            println!("Store the key now: it is shown only once. The last line is the key alone.");
            println!("{}", root.expose_secret());
            Ok(())
        }
        Err(err) if matches!(err.downcast_ref::<Error>(), Some(Error::AlreadyExists(_))) => {
            anyhow::bail!("refusing to bootstrap: {err}")
        }
        Err(err) => Err(err),
    }
}

fn build_runtime(settings: &Settings) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match settings.runtime.flavor {
        RuntimeFlavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        RuntimeFlavor::MultiThread => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if settings.runtime.worker_threads > 0 {
                b.worker_threads(settings.runtime.worker_threads);
            }
            b
        }
    };
    builder.enable_all().build()
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C. The SIGTERM handler is installed when this is
/// called, not when it is first awaited.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let registered = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        shutdown_requested(
            #[cfg(unix)]
            registered,
        )
        .await;
    }
}

async fn shutdown_requested(#[cfg(unix)] registered: std::io::Result<tokio::signal::unix::Signal>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match registered {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested: draining in-flight calls");
}
