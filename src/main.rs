//! The `fhirledger` binary: subcommands and start-up configuration.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fhirledger::config::{DatabaseArgs, KeyOrigin, LogFormat, ServeArgs};
use fhirledger::store::{connection, migrations};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "fhirledger",
    version,
    about = "FHIR R4 server with encrypted storage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the FHIR server (embedded SQLite in ./data unless configured otherwise).
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(*args),
        Command::Migrate(args) => {
            init_logging("info", LogFormat::Text).and_then(|()| run_migrate(&args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fhirledger: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log, args.log_format)?;
    let (master_key, origin) = args.load_master_key()?;
    match origin {
        KeyOrigin::Configured => tracing::info!(key_id = %master_key.id(), "master key loaded"),
        KeyOrigin::DevelopmentGenerated | KeyOrigin::DevelopmentExisting => {
            let verb = if origin == KeyOrigin::DevelopmentGenerated {
                "GENERATED"
            } else {
                "USING"
            };
            tracing::warn!(
                "{verb} A DEVELOPMENT MASTER KEY in {}: anyone who can read that directory can decrypt \
                 every record. Production deployments set FHIRLEDGER_MASTER_KEY_FILE to a key kept apart \
                 from the database.",
                args.database.data_dir.display()
            );
        }
    }
    // actix-web's System runs the server; SIGTERM/SIGINT stop it after requests in flight.
    let system = actix_web::rt::System::new();
    let (ledger_key, ledger_origin) = args.load_ledger_key()?;
    match ledger_origin {
        KeyOrigin::Configured => {
            tracing::info!(
                origin = ledger_key.name(),
                key_id = format!("{:08x}", ledger_key.key_id()),
                "ledger key loaded"
            )
        }
        KeyOrigin::DevelopmentGenerated | KeyOrigin::DevelopmentExisting => tracing::warn!(
            origin = ledger_key.name(),
            "USING A DEVELOPMENT LEDGER KEY from {}: checkpoints it signs are only as trustworthy as that \
             directory. Production deployments set FHIRLEDGER_LEDGER_KEY_FILE.",
            args.database.data_dir.display()
        ),
    }
    let keys = fhirledger::server::Keys {
        master: master_key,
        ledger: ledger_key,
    };
    system.block_on(fhirledger::server::serve(args, keys))
}

fn run_migrate(args: &DatabaseArgs) -> anyhow::Result<()> {
    let url = args.resolved_database_url();
    if let fhirledger::store::DatabaseUrl::Sqlite(_) = url {
        fhirledger::config::ensure_private_dir(&args.data_dir)?;
    }
    let mut conn = connection::establish(&url)?;
    let applied = migrations::run_pending(&mut conn)?;
    tracing::info!(applied, "migrations applied");
    Ok(())
}

fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).map_err(|e| {
        anyhow::anyhow!("FHIRLEDGER_LOG '{filter}' is not a valid tracing filter: {e}")
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
