//! The `spcs-image-scanner` binary: parses the command line, loads the config, starts
//! logging and calls into the library. The only place that prints the final error and
//! picks the exit code: 0 ok, 1 a runtime failure (or a failed scan in `once`), 64 bad
//! config or usage, or a state store that cannot be used as it is (locked by another
//! process, damaged, a corrupt record, a newer schema), 130 forced stop.
//!
//! `state rebuild` ([`spcs_image_scanner::rebuild`]) makes a new store from the output
//! dir and the SBOM cache when the store is lost or damaged; the old one is moved aside.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use spcs_image_scanner::client::{self, RescanScope};
use spcs_image_scanner::commands::{self, CommandError};
use spcs_image_scanner::config::{Config, Environment};
use spcs_image_scanner::daemon::{Daemon, DaemonError, STOP_DEADLINE};
use spcs_image_scanner::scanner::error_chain;
use spcs_image_scanner::worker::WorkerError;
use spcs_image_scanner::{logging, shutdown};

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 64;
const EXIT_FORCED: u8 = 130;

/// Watches an OCI registry and scans new or changed images with syft and grype.
#[derive(Debug, Parser)]
#[command(name = "spcs-image-scanner", version)]
struct Cli {
    /// Config file (TOML). Keys can be overridden with SCANNER__SECTION__KEY variables.
    #[arg(
        long,
        global = true,
        env = "SPCS_IMAGE_SCANNER_CONFIG",
        default_value = "config/scanner.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: a cycle at start-up, then on schedule.cron, until SIGTERM/SIGINT.
    Run,
    /// Run one cycle with its scans, then exit: 0 if every scan succeeded, 1 if any failed.
    Once,
    /// Validate the config and print the effective values (it holds no secret).
    CheckConfig,
    /// Print what the state store knows, one line per digest (the daemon must be stopped).
    Report {
        /// One JSON object per digest instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running daemon what it knows (GET /status): a readable summary, or JSON.
    Status {
        /// The daemon's API, e.g. http://127.0.0.1:8080 (default: from api.listen).
        #[arg(long, env = "SPCS_IMAGE_SCANNER_ENDPOINT")]
        endpoint: Option<String>,
        /// The whole /status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running daemon to rescan now (POST /rescan); returns at once with a request id.
    #[command(group(clap::ArgGroup::new("scope").required(true).args(["all", "repository", "image"])))]
    Rescan {
        /// Every image.
        #[arg(long)]
        all: bool,
        /// Every image tagged in this repository.
        #[arg(long, value_name = "R")]
        repository: Option<String>,
        /// One image: repo:tag, repo@sha256:..., or a digest.
        #[arg(long, value_name = "REF")]
        image: Option<String>,
        /// Scan even images already scanned with the current DB, with a fresh SBOM.
        #[arg(long)]
        force: bool,
        /// The daemon's API (default: from api.listen).
        #[arg(long, env = "SPCS_IMAGE_SCANNER_ENDPOINT")]
        endpoint: Option<String>,
    },
    /// The vulnerability DB (grype's, in vulndb.cache_dir).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// The state store (state.dir/db).
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// Rebuild a lost or damaged store from output.dir (results, SBOMs, inventory) and
    /// the SBOM cache: the old store is moved to state.dir/db.corrupt-<UTC timestamp>,
    /// never deleted. Refused while another process holds the store (exit 64); exit 1
    /// when nothing could be rebuilt from a non-empty output dir (the old store stays).
    Rebuild,
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Identity, age and last update of the DB; exit 1 when scans could not use it.
    Status {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check for a newer DB (vulndb.update_url or grype's default) and install it.
    Update,
    /// Install a DB archive (grype db import): for air-gapped installs.
    Import {
        /// The archive (vulnerability-db_*.tar.zst) or vulnerability.db file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Command::Status { endpoint, .. } | Command::Rescan { endpoint, .. } = &cli.command {
        // A client: the config only supplies the default endpoint.
        let config = match endpoint {
            Some(_) => None,
            None => match Config::load(&cli.config, &Environment::from_process()) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("error: {}", error_chain(&e));
                    return ExitCode::from(EXIT_USAGE);
                }
            },
        };
        let url = match client::endpoint(endpoint.as_deref(), config.as_ref()) {
            Ok(u) => u,
            Err(e) => return finish(Err(e)),
        };
        let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        return finish(runtime.block_on(async {
            match cli.command {
                Command::Status { json, .. } => client::status(&url, json).await,
                Command::Rescan {
                    repository,
                    image,
                    force,
                    ..
                } => {
                    let scope = match (repository, image) {
                        (Some(r), _) => RescanScope::Repository(r),
                        (_, Some(i)) => RescanScope::Image(i),
                        _ => RescanScope::All,
                    };
                    client::rescan(&url, &scope, force).await
                }
                _ => Ok(String::new()),
            }
        }));
    }
    let config = match Config::load(&cli.config, &Environment::from_process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Command::CheckConfig = cli.command {
        print!("{}", config.effective_toml());
        println!("# {}: OK", config.source.display());
        return ExitCode::SUCCESS;
    }
    if let Command::Report { json } = cli.command {
        return finish(commands::report(&config, json));
    }
    logging::init(&config.log);
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    if let Command::Db { command } = cli.command {
        return runtime.block_on(async {
            match command {
                DbCommand::Status { json } => match commands::db_status(&config, json).await {
                    Ok((text, ready)) => {
                        print!("{text}");
                        if ready {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::from(EXIT_FAILURE)
                        }
                    }
                    Err(e) => finish(Err(e)),
                },
                DbCommand::Update => finish(commands::db_update(&config).await),
                DbCommand::Import { file } => finish(commands::db_import(&config, &file).await),
            }
        });
    }
    if let Command::State {
        command: StateCommand::Rebuild,
    } = cli.command
    {
        return finish(runtime.block_on(commands::state_rebuild(&config)));
    }
    runtime.block_on(async_main(cli.command, config))
}

async fn async_main(command: Command, config: Config) -> ExitCode {
    let root = CancellationToken::new();
    let forced = match shutdown::listen(root.clone()) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let work = async {
        let daemon = match Daemon::open(config).await {
            Ok(d) => d,
            Err(e) => {
                let text = error_chain(&e);
                tracing::error!(error = %text, "cannot start");
                // Also on stderr: the log may be JSON on stdout, and an operator starting
                // the daemon by hand must see why it did not start.
                eprintln!("error: cannot start: {text}");
                return ExitCode::from(if e.is_setup_error() || unusable_store(&e) {
                    EXIT_USAGE
                } else {
                    EXIT_FAILURE
                });
            }
        };
        match command {
            Command::Run => match daemon.run(root.clone()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "daemon stopped on an error");
                    ExitCode::from(EXIT_FAILURE)
                }
            },
            Command::Once => match daemon.once(&root).await {
                Ok(summary) if summary.failed == 0 && summary.held == 0 && !root.is_cancelled() => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_FAILURE),
            },
            Command::CheckConfig
            | Command::Report { .. }
            | Command::Db { .. }
            | Command::State { .. }
            | Command::Status { .. }
            | Command::Rescan { .. } => ExitCode::SUCCESS,
        }
    };
    // A graceful stop that overruns its deadline (SPCS kills the container 30 s after
    // SIGTERM) ends the process anyway; running scanners were killed on cancellation.
    let deadline = async {
        root.cancelled().await;
        tokio::time::sleep(STOP_DEADLINE).await;
    };
    tokio::select! {
        code = work => code,
        _ = forced => ExitCode::from(EXIT_FORCED),
        _ = deadline => {
            tracing::error!(deadline = ?STOP_DEADLINE, "graceful stop overran its deadline; exiting");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// A store that cannot be used as it is (damaged, corrupt, newer, locked), found when
/// opening it or during start-up recovery: the operator must act (exit 64).
fn unusable_store(e: &DaemonError) -> bool {
    match e {
        DaemonError::State(s) | DaemonError::Recovery(WorkerError::State(s)) => {
            s.is_unusable_store()
        }
        _ => false,
    }
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

fn finish(result: Result<String, CommandError>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(if e.setup { EXIT_USAGE } else { EXIT_FAILURE })
        }
    }
}
