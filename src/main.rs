//! The `fhirledger` binary: subcommands and start-up configuration.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fhirledger::config::{AddressArgs, DatabaseArgs, KeyOrigin, LogFormat, ServeArgs};
use fhirledger::store::{connection, migrations};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than the system allocator: a request allocates and frees many small
/// buffers across threads (JSON, ciphertext, SQL rows), where glibc's malloc showed about 8%
/// of a read's CPU in a profile, its per-thread arenas contending and trimming.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Check a database against its ledger: exit 0 when everything matches, 1 when
    /// something was tampered with, 2 when the check could not be made.
    Audit(AuditArgs),
    /// Print a token signed by the local issuer (the key in the data directory), which the
    /// server trusts unless FHIRLEDGER_LOCAL_ISSUER=false.
    Token(TokenArgs),
    /// Check a server's signed checkpoint, that its log only grew since the last run, and
    /// optionally a receipt: exit 0 ok, 1 proof failed, 2 could not check.
    Verify(VerifyArgs),
    /// Load NDJSON files (one resource per line, plain or gzip; directories: their *.ndjson
    /// and *.ndjson.gz files) through the server's validation, encryption, indexing and
    /// ledger, keeping ids. Takes serve's configuration. Resumes an interrupted run.
    /// Exit 0 every line loaded, 1 some lines rejected (the rest loaded), 2 stopped.
    Import(Box<ImportArgs>),
    /// Key custody: `keys split` turns the master key into Shamir shares; `keys rotate-index`
    /// rebuilds the search index for a new index key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Give a sealed server (`serve --sealed`) one master key share, read from the argument
    /// or, without one, from standard input. Exit 0 accepted, 1 refused, 2 no server.
    Unseal(UnsealArgs),
    /// Run a witness: cosign the checkpoints of the logs it follows (C2SP tlog-witness
    /// add-checkpoint) once each is consistent with the last it cosigned.
    Witness(WitnessArgs),
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Split the master key (read as `serve` reads it) into N shares, any K of which rebuild
    /// it; prints one share per line and ledgers the split. Give each share to a different
    /// custodian, then remove the key from the server's configuration and start it with
    /// FHIRLEDGER_SEALED=true.
    Split(Box<SplitArgs>),
    /// Rebuild the search index for a new index key (the blind-index digests depend on it).
    /// Stop every server first; the index key configured as for `serve` must be the one the
    /// index was built with. Resumable: run it again after an interruption. Then start the
    /// servers with the new key (FHIRLEDGER_INDEX_KEY_FILE).
    RotateIndex(Box<RotateIndexArgs>),
}

#[derive(Debug, clap::Args)]
struct RotateIndexArgs {
    /// The new index key: a file holding 32 random bytes in base64
    /// (`head -c 32 /dev/urandom | base64 > new-index.key`).
    #[arg(long, value_name = "PATH")]
    new_key_file: std::path::PathBuf,

    /// The server's configuration: the database and the keys it runs with.
    #[command(flatten)]
    server: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct SplitArgs {
    /// How many shares to make (2 to 255).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(2..))]
    shares: u8,

    /// How many shares rebuild the key (2 to N).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u8).range(2..))]
    threshold: u8,

    /// The server's configuration: the master key to split, and the database whose ledger
    /// records the split.
    #[command(flatten)]
    server: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct UnsealArgs {
    /// The share (`fhirledger-share-v1:…`); read from standard input when absent, which keeps
    /// it out of the shell's history.
    #[arg(value_name = "SHARE")]
    share: Option<String>,

    /// The sealed server's address on this machine.
    #[arg(
        long,
        env = "FHIRLEDGER_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    listen: std::net::SocketAddr,
}

#[derive(Debug, clap::Args)]
struct WitnessArgs {
    /// The witness's name in its cosignatures, a schema-less URL (e.g. witness.example/w1).
    #[arg(long, env = "FHIRLEDGER_WITNESS_NAME", value_name = "NAME")]
    name: String,

    /// The verifier key of a log to witness (`name+keyid+base64key`, from the log's
    /// GET /ledger/key); repeat the flag, or separate keys with commas in the variable.
    #[arg(
        long = "log",
        env = "FHIRLEDGER_WITNESS_LOGS",
        value_name = "VKEY",
        value_delimiter = ','
    )]
    logs: Vec<String>,

    /// Directory of the witness's state (the latest checkpoint cosigned per log) and, unless
    /// --key-file names another, of its key (witness.key, created on the first start).
    #[arg(
        long,
        env = "FHIRLEDGER_WITNESS_DIR",
        value_name = "PATH",
        default_value = "witness"
    )]
    dir: std::path::PathBuf,

    /// File holding the witness's base64 Ed25519 seed.
    #[arg(long, env = "FHIRLEDGER_WITNESS_KEY_FILE", value_name = "PATH")]
    key_file: Option<std::path::PathBuf>,

    /// Address to listen on; the submission prefix is the root (POST /add-checkpoint).
    #[arg(
        long,
        env = "FHIRLEDGER_WITNESS_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8090"
    )]
    listen: std::net::SocketAddr,

    /// Print the witness's cosignature verifier key (for the log's FHIRLEDGER_WITNESSES and
    /// for `verify --witness`) and exit.
    #[arg(long)]
    print_vkey: bool,
}

#[derive(Debug, clap::Args)]
struct ImportArgs {
    /// NDJSON files, or directories holding them.
    #[arg(required = true, value_name = "FILE_OR_DIR")]
    paths: Vec<std::path::PathBuf>,

    /// Lines written per database transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=5000))]
    batch_lines: u16,

    /// Write every rejected line (file, line number, OperationOutcome) to this file, one
    /// JSON object per line.
    #[arg(long, value_name = "PATH")]
    report: Option<std::path::PathBuf>,

    /// The server's configuration: the same database, keys and limits as `serve`.
    #[command(flatten)]
    server: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct AuditArgs {
    #[command(flatten)]
    database: DatabaseArgs,

    /// The ledger's verifier key (`name+keyid+base64key`, from GET /ledger/key). Default:
    /// the development ledger key in the data directory.
    #[arg(long, env = "FHIRLEDGER_LEDGER_VKEY", value_name = "VKEY")]
    vkey: Option<String>,

    /// File holding the base64 ledger signing key, as `serve` takes it (its public half
    /// checks the log). Used when no --vkey is given.
    #[arg(long, env = "FHIRLEDGER_LEDGER_KEY_FILE", value_name = "PATH")]
    ledger_key_file: Option<std::path::PathBuf>,

    /// The base64 ledger signing key itself (prefer the file).
    #[arg(
        long,
        env = "FHIRLEDGER_LEDGER_KEY",
        value_name = "BASE64",
        hide_env_values = true
    )]
    ledger_key: Option<String>,

    /// A signed checkpoint the auditor trusts (a note saved earlier, such as the state file
    /// of `fhirledger verify`): the log must still extend it, so dropped or rewritten
    /// entries are found even when the database was made consistent again.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    #[command(flatten)]
    address: AddressArgs,

    #[command(flatten)]
    database: DatabaseArgs,

    /// The token's subject (`sub`): who the bearer is.
    #[arg(long, value_name = "ID")]
    sub: String,

    /// Space-separated SMART scopes, e.g. "system/*.cruds ledger.read".
    #[arg(long, value_name = "SCOPES")]
    scope: String,

    /// The launch patient's id (`patient` claim), for patient/ scopes.
    #[arg(long, value_name = "ID")]
    patient: Option<String>,

    /// The user's FHIR resource (`fhirUser` claim), e.g. Practitioner/123.
    #[arg(long, value_name = "REFERENCE")]
    fhir_user: Option<String>,

    /// The client (`client_id` claim).
    #[arg(long, value_name = "ID", default_value = "fhirledger-cli")]
    client_id: String,

    /// Purpose of use (`purpose_of_use` claim), e.g. ETREAT for break-the-glass.
    #[arg(long, value_name = "CODE")]
    purpose_of_use: Option<String>,

    /// Lifetime in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    ttl: u64,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    /// Base URL of the server, e.g. https://fhir.example.org
    #[arg(long, value_name = "URL")]
    server: String,

    /// The pinned verifier key (`name+keyid+base64key`), obtained out of band.
    #[arg(long, env = "FHIRLEDGER_LEDGER_VKEY", value_name = "VKEY")]
    vkey: String,

    /// File keeping the last verified checkpoint, to detect a rolled-back or forked log.
    #[arg(long, value_name = "PATH")]
    state: Option<std::path::PathBuf>,

    /// A receipt (X-Ledger-Entry header) whose entry must be included in the log.
    #[arg(long, value_name = "RECEIPT")]
    receipt: Option<String>,

    /// A bearer token with the `ledger.read` scope: the server answers proofs and receipts
    /// only to such tokens.
    #[arg(
        long,
        env = "FHIRLEDGER_TOKEN",
        value_name = "JWT",
        hide_env_values = true
    )]
    token: Option<String>,

    /// A witness whose cosignatures count (its cosignature verifier key); repeat for each.
    /// With witnesses, the checkpoint checked must be cosigned by --witness-threshold of them.
    #[arg(long = "witness", value_name = "VKEY")]
    witnesses: Vec<String>,

    /// How many of the --witness keys must have cosigned the checkpoint (default: all).
    #[arg(long, value_name = "K")]
    witness_threshold: Option<usize>,

    /// Seconds a receipt's entry time may lie outside the bounds the witnesses' clocks set.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    time_tolerance: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Audit(args) => return run_audit(&args),
        Command::Verify(args) => return run_verify(args),
        Command::Import(args) => return run_import(*args),
        Command::Token(args) => run_token(&args),
        Command::Witness(args) => run_witness(&args),
        Command::Keys(KeysCommand::Split(args)) => run_split(*args),
        Command::Keys(KeysCommand::RotateIndex(args)) => run_rotate_index(*args),
        Command::Unseal(args) => return run_unseal(&args),
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
    if args.sealed && (args.master_key_file.is_some() || args.master_key.is_some()) {
        anyhow::bail!(
            "FHIRLEDGER_SEALED takes the master key from its shares: do not also set \
             FHIRLEDGER_MASTER_KEY_FILE or FHIRLEDGER_MASTER_KEY"
        );
    }
    // actix-web's System runs the server; SIGTERM/SIGINT stop it after requests in flight.
    let system = actix_web::rt::System::new();
    let unsealed = if args.sealed {
        Some(system.block_on(fhirledger::unseal::wait_for_master_key(args.address.listen))?)
    } else {
        None
    };
    let mut keys = load_keys(&args, unsealed)?;
    keys.local_issuer = match args.load_local_issuer()? {
        Some((issuer, generated)) => {
            tracing::warn!(
                issuer = issuer.issuer(),
                "{} THE LOCAL TOKEN ISSUER: anyone who can read {} can mint any token this server accepts. \
                 Production deployments set FHIRLEDGER_LOCAL_ISSUER=false and FHIRLEDGER_TRUSTED_ISSUERS.",
                if generated {
                    "GENERATED A KEY FOR"
                } else {
                    "TRUSTING"
                },
                args.database.data_dir.display()
            );
            Some(issuer)
        }
        None => None,
    };
    system.block_on(fhirledger::server::serve(args, keys))
}

/// The keys `serve` (and `import`, which writes as the server does) runs with, saying
/// loudly which are development keys; without the local token issuer, which only `serve`
/// starts.
fn load_keys(
    args: &ServeArgs,
    unsealed: Option<fhirledger::crypto::MasterKey>,
) -> anyhow::Result<fhirledger::server::Keys> {
    let (master_key, origin) = match unsealed {
        Some(key) => (key, KeyOrigin::Configured),
        None => args.load_master_key()?,
    };
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
    let (index_key, index_origin) = args.load_index_key()?;
    if index_origin != KeyOrigin::Configured {
        tracing::warn!(
            "USING A DEVELOPMENT INDEX KEY from {}: with it, search index digests can be tested against \
             guessed values. Production deployments set FHIRLEDGER_INDEX_KEY_FILE.",
            args.database.data_dir.display()
        );
    }
    Ok(fhirledger::server::Keys {
        master: master_key,
        ledger: ledger_key,
        index: index_key,
        local_issuer: None,
    })
}

fn run_import(args: ImportArgs) -> ExitCode {
    use std::io::IsTerminal as _;
    let run = || -> anyhow::Result<fhirledger::import::ImportSummary> {
        init_logging(&args.server.log, args.server.log_format)?;
        let keys = load_keys(&args.server, None)?;
        let options = fhirledger::server::StateOptions::from_args(&args.server)?;
        let state = fhirledger::server::prepare_state(
            &args.server.database.resolved_database_url(),
            keys,
            &options,
        )?;
        fhirledger::import::run_import(
            &state,
            &fhirledger::import::ImportOptions {
                paths: args.paths.clone(),
                batch_lines: usize::from(args.batch_lines),
                max_line_bytes: args.server.max_body_bytes,
                report: args.report.clone(),
                progress: std::io::stderr().is_terminal(),
            },
        )
    };
    match run() {
        Ok(summary) => {
            let seconds = summary.elapsed.as_secs_f64();
            println!(
                "imported {} resources ({} created, {} updated) from {} files in {seconds:.1} s \
                 ({:.0} resources/s); {} lines rejected; {} lines loaded by an earlier run",
                summary.written(),
                summary.created,
                summary.updated,
                summary.files,
                summary.written() as f64 / seconds.max(0.001),
                summary.rejected,
                summary.lines_already_done,
            );
            if summary.rejected > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("fhirledger import: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run_split(args: SplitArgs) -> anyhow::Result<()> {
    use fhirledger::ledger::Action;
    use fhirledger::service::ledger::LedgerEvent;
    init_logging(&args.server.log, args.server.log_format)?;
    if args.threshold > args.shares {
        anyhow::bail!("--threshold must not exceed --shares");
    }
    if args.server.sealed {
        anyhow::bail!("a sealed server's key is already split; keys split reads a configured key");
    }
    let keys = load_keys(&args.server, None)?;
    let key_id = keys.master.id().as_str().to_owned();
    let shares = fhirledger::crypto::shares::split(&keys.master, args.shares, args.threshold)?;
    // The split is ledgered before any share is shown.
    let options = fhirledger::server::StateOptions::from_args(&args.server)?;
    let state = fhirledger::server::prepare_state(
        &args.server.database.resolved_database_url(),
        keys,
        &options,
    )?;
    let ctx = fhirledger::access::RequestContext::internal("keys-split");
    state.ledger.append(
        &ctx,
        LedgerEvent::permit(Action::KeySplit).about_key(&key_id),
    )?;
    state.ledger.sequence_pending()?;
    eprintln!(
        "master key {key_id} split into {} shares, any {} of which rebuild it. Give each to a \
         different custodian; then remove the key from this server's configuration (and its file) \
         and start it with FHIRLEDGER_SEALED=true.",
        args.shares, args.threshold
    );
    for share in &shares {
        println!("{}", share.as_str());
    }
    Ok(())
}

fn run_rotate_index(args: RotateIndexArgs) -> anyhow::Result<()> {
    init_logging(&args.server.log, args.server.log_format)?;
    let new_key = fhirledger::crypto::keys::read_secret_file(&args.new_key_file, "--new-key-file")?;
    let keys = load_keys(&args.server, None)?;
    let mut options = fhirledger::server::StateOptions::from_args(&args.server)?;
    options.index_maintenance = true;
    let state = fhirledger::server::prepare_state(
        &args.server.database.resolved_database_url(),
        keys,
        &options,
    )?;
    let rekey = state
        .resources
        .rotate_index_key(fhirledger::crypto::BlindIndexKey::from_bytes(*new_key))?;
    println!(
        "search index rebuilt for index key {} ({} resources{}); index key {} retired. \
         Start the servers with FHIRLEDGER_INDEX_KEY_FILE={}",
        rekey.new_key,
        rekey.rebuilt,
        if rekey.resumed {
            " in this run, which continued a stopped one"
        } else {
            ""
        },
        rekey.old_key,
        args.new_key_file.display()
    );
    Ok(())
}

fn run_unseal(args: &UnsealArgs) -> ExitCode {
    let share = match &args.share {
        Some(share) => zeroize::Zeroizing::new(share.clone()),
        None => {
            let mut line = zeroize::Zeroizing::new(String::new());
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("fhirledger unseal: cannot read the share: {e}");
                return ExitCode::from(2);
            }
            line
        }
    };
    let url = format!("http://{}{}", args.listen, fhirledger::unseal::UNSEAL_PATH);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let mut response = match agent.post(&url).send(share.trim().as_bytes()) {
        Ok(response) => response,
        Err(e) => {
            eprintln!("fhirledger unseal: {url}: {e}");
            return ExitCode::from(2);
        }
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response
        .body_mut()
        .read_to_string()
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    match status {
        200 => {
            println!(
                "unsealed: master key {} rebuilt; the server is starting",
                body["key_id"].as_str().unwrap_or("?")
            );
            ExitCode::SUCCESS
        }
        202 => {
            println!(
                "share accepted: {} of {} (master key {})",
                body["have"],
                body["need"],
                body["key_id"].as_str().unwrap_or("?")
            );
            ExitCode::SUCCESS
        }
        _ => {
            let why = body["issue"][0]["diagnostics"]
                .as_str()
                .map_or_else(|| format!("status {status}"), str::to_owned);
            eprintln!("fhirledger unseal: refused: {why}");
            ExitCode::from(1)
        }
    }
}

fn run_witness(args: &WitnessArgs) -> anyhow::Result<()> {
    use fhirledger::crypto::keys::{load_or_create_secret_file, read_secret_file};
    use fhirledger::ledger::cosignature::WitnessKey;
    fhirledger::config::ensure_private_dir(&args.dir)?;
    let seed = match &args.key_file {
        Some(path) => read_secret_file(path, "FHIRLEDGER_WITNESS_KEY_FILE")?,
        None => load_or_create_secret_file(&args.dir.join("witness.key"), "witness key")?.0,
    };
    let key = WitnessKey::from_seed(*seed, &args.name)?;
    let vkey = key.verifier().vkey();
    if args.print_vkey {
        println!("{vkey}");
        return Ok(());
    }
    if args.logs.is_empty() {
        anyhow::bail!("name at least one log to witness: --log VKEY or FHIRLEDGER_WITNESS_LOGS");
    }
    init_logging("info", LogFormat::Text)?;
    let witness = fhirledger::witness::Witness::open(key, &args.logs, &args.dir)
        .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(%vkey, listen = %args.listen, logs = args.logs.len(), "witness started");
    let system = actix_web::rt::System::new();
    system.block_on(fhirledger::witness::serve(
        std::sync::Arc::new(witness),
        args.listen,
    ))?;
    Ok(())
}

fn run_token(args: &TokenArgs) -> anyhow::Result<()> {
    use fhirledger::access::local_issuer::{LOCAL_ISSUER_KEY_FILE, LocalIssuer, TokenRequest};
    let data_dir = &args.database.data_dir;
    // Only `serve` creates the key: one made here, in a directory the server does not use,
    // would sign tokens the server refuses.
    let Some(issuer) = LocalIssuer::load_existing(data_dir, &args.address.resolved_base_url())?
    else {
        let shown = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.clone());
        anyhow::bail!(
            "no local issuer key in the data directory {} ({LOCAL_ISSUER_KEY_FILE} is missing). \
             `fhirledger serve` creates it there on its first start; run `fhirledger token` from \
             the directory the server was started in, or name the server's data directory with \
             --data-dir or FHIRLEDGER_DATA_DIR",
            shown.display()
        );
    };
    let token = issuer
        .mint(&TokenRequest {
            subject: args.sub.clone(),
            scope: args.scope.clone(),
            client_id: Some(args.client_id.clone()),
            patient: args.patient.clone(),
            fhir_user: args.fhir_user.clone(),
            purpose_of_use: args.purpose_of_use.clone(),
            ttl_seconds: args.ttl,
        })
        .map_err(|e| anyhow::anyhow!("cannot mint the token: {e}"))?;
    println!("{token}");
    Ok(())
}

fn run_audit(args: &AuditArgs) -> ExitCode {
    use fhirledger::service::audit::audit;
    let could_not_check = |message: String| {
        eprintln!("fhirledger audit: could not check: {message}");
        ExitCode::from(2)
    };
    let url = args.database.resolved_database_url();
    let mut conn = match connection::establish(&url) {
        Ok(conn) => conn,
        Err(e) => return could_not_check(format!("cannot open the database: {e}")),
    };
    let key = match audit_key(args, &mut conn) {
        Ok(key) => key,
        Err(message) => return could_not_check(message),
    };
    let keys = match fhirledger::service::audit::audit_keys(&mut conn, &key) {
        Ok(keys) => keys,
        Err(problem) => {
            // The database's chain of keys does not lead from the auditor's key.
            println!("KeyChain: {problem}");
            println!("audited nothing further: 1 problem");
            return ExitCode::from(1);
        }
    };
    let trusted = match &args.checkpoint {
        None => None,
        Some(path) => {
            let note = match std::fs::read_to_string(path) {
                Ok(note) => note,
                Err(e) => return could_not_check(format!("{}: {e}", path.display())),
            };
            let size = note
                .lines()
                .nth(1)
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            let signer = &keys.chain.for_checkpoint(size).vkey;
            match fhirledger::ledger::checkpoint::verify_checkpoint(&note, signer) {
                Ok(checkpoint) => Some(checkpoint),
                Err(e) => {
                    return could_not_check(format!(
                        "{}: the trusted checkpoint does not verify with the ledger key: {e}",
                        path.display()
                    ));
                }
            }
        }
    };
    let mut progress = |line: &str| eprintln!("audit: {line}");
    let report = match audit(&mut conn, &keys, trusted.as_ref(), &mut progress) {
        Ok(report) => report,
        Err(e) => return could_not_check(e.to_string()),
    };
    for finding in &report.findings {
        println!("{:?}: {}", finding.kind, finding.detail);
    }
    println!(
        "audited {} ledger entries ({} pending), {} checkpoints, {} resource versions: {}",
        report.entries_checked,
        report.pending_entries,
        report.checkpoints_checked,
        report.versions_checked,
        if report.is_clean() {
            "everything matches".to_owned()
        } else {
            format!("{} problems", report.findings.len())
        }
    );
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The key entries and checkpoints are checked with: the given verifier key, else the
/// ledger key configured as for `serve` (FHIRLEDGER_LEDGER_KEY_FILE or FHIRLEDGER_LEDGER_KEY),
/// else the development key in the data directory; a signing key is named after the latest
/// checkpoint's origin.
fn audit_key(
    args: &AuditArgs,
    conn: &mut fhirledger::store::DbConnection,
) -> Result<fhirledger::service::audit::AuditKey, String> {
    use fhirledger::crypto::keys::{decode_key_base64, read_secret_file};
    use fhirledger::ledger::keys::{DEV_LEDGER_KEY_FILE, parse_vkey};
    if let Some(vkey) = &args.vkey {
        let (_, verifying_key) = parse_vkey(vkey).map_err(|e| format!("--vkey: {e}"))?;
        return Ok(fhirledger::service::audit::AuditKey {
            verifying_key,
            vkey: vkey.clone(),
        });
    }
    let origin = fhirledger::store::ledger::latest_checkpoint(conn)
        .map_err(|e| e.to_string())?
        .and_then(|c| c.note.lines().next().map(str::to_owned))
        .ok_or("no checkpoint in the database and no --vkey given")?;
    let seed = match (&args.ledger_key_file, &args.ledger_key) {
        (Some(_), Some(_)) => {
            return Err(
                "set only one of FHIRLEDGER_LEDGER_KEY_FILE and FHIRLEDGER_LEDGER_KEY".into(),
            );
        }
        (Some(path), None) => {
            read_secret_file(path, "FHIRLEDGER_LEDGER_KEY_FILE").map_err(|e| e.to_string())?
        }
        (None, Some(text)) => {
            decode_key_base64(text, "FHIRLEDGER_LEDGER_KEY").map_err(|e| e.to_string())?
        }
        (None, None) => {
            let path = args.database.data_dir.join(DEV_LEDGER_KEY_FILE);
            read_secret_file(&path, "development ledger key").map_err(|e| {
                format!("{e}; give --vkey, or FHIRLEDGER_LEDGER_KEY_FILE as the server has it")
            })?
        }
    };
    let key = fhirledger::ledger::LedgerKey::from_seed(*seed, &origin)?;
    Ok(fhirledger::service::audit::AuditKey {
        verifying_key: key.verifying_key(),
        vkey: key.vkey(),
    })
}

fn run_verify(args: VerifyArgs) -> ExitCode {
    use fhirledger::verifier::{VerifyError, VerifyOptions, verify};
    let options = VerifyOptions {
        server: args.server,
        vkey: args.vkey,
        state_file: args.state,
        receipt: args.receipt,
        token: args.token,
        witnesses: args.witnesses,
        witness_threshold: args.witness_threshold,
        time_tolerance: std::time::Duration::from_secs(args.time_tolerance),
    };
    match verify(&options, &mut |line| println!("ok: {line}")) {
        Ok(()) => {
            println!("verified");
            ExitCode::SUCCESS
        }
        Err(error @ VerifyError::Failed(_)) => {
            println!("{error}");
            ExitCode::from(1)
        }
        Err(error @ VerifyError::CouldNotCheck(_)) => {
            println!("{error}");
            ExitCode::from(2)
        }
    }
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
