//! The `perfbox` binary: `serve` runs the service; `submit`, `status`, `logs`, `spec`, `audit`
//! and `receipt` are a small client of its HTTP API; `verify` checks a receipt offline;
//! `keygen` makes the receipt key pair at install.

mod audit_cmd;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use perfbox::api::serve::{ServeOptions, TlsState as ApiTls};
use perfbox::buildkit::BuildkitClient;
use perfbox::config::Config;
use perfbox::jobs::service::{Deps, build_cgroups_for};
use perfbox::jobs::{JobService, SqliteStore, pg_store::PgStore};
use perfbox::sandbox::{Sandbox, SandboxConfig};

#[derive(Parser)]
#[command(
    name = "perfbox",
    version,
    about = "Build a Dockerfile rootless, run it in a hardened sandbox, report its perf"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service.
    Serve(ServeArgs),
    /// Submit a Dockerfile, or a directory as the build context with its Dockerfile at the root
    /// (prints the job id; with --wait, follows it and prints perf).
    Submit {
        /// The Dockerfile, or the context directory.
        dockerfile: PathBuf,
        /// Wait for the result, showing progress.
        #[arg(long)]
        wait: bool,
        /// A build arg, NAME=value (repeatable; BUILDKIT_* names are refused).
        #[arg(long = "build-arg", value_name = "NAME=VALUE")]
        build_args: Vec<String>,
        /// Build this stage of a multi-stage Dockerfile.
        #[arg(long)]
        target: Option<String>,
        /// Mount this configured dataset read-only at /input in the run.
        #[arg(long)]
        dataset: Option<String>,
        /// Submit at most once per key: the same key again answers the first job.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a job's full record.
    Status {
        /// Job id.
        id: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a job's build and run logs.
    Logs {
        /// Job id.
        id: i64,
        /// Keep streaming until the job ends.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the OCI runtime spec (config.json) a job ran with.
    Spec {
        /// Job id.
        id: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check jobs against every audit rule (sandbox spec, its recorded digest, the build record);
    /// exits 0 only when every audited job passes.
    Audit {
        /// Job ids.
        ids: Vec<i64>,
        /// Every job (visible to the token).
        #[arg(long)]
        all: bool,
        /// With --all: jobs submitted at or after this date or RFC 3339 time.
        #[arg(long, value_name = "DATE")]
        since: Option<String>,
        /// The full report as JSON.
        #[arg(long)]
        json: bool,
        /// List passing rules and their evidence too.
        #[arg(long, short)]
        verbose: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the signed receipt of a finished job.
    Receipt {
        /// Job id.
        id: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Check a receipt offline: its fields, then its signature (exit 0 valid, 1 not).
    Verify {
        /// The receipt file (`-`: stdin).
        receipt: PathBuf,
        /// The public key: a file with its base64 line (receipt.pub) or GET /receipt-key's JSON.
        /// Default: receipt.pub in $PERFBOX_STATE_DIR or /var/lib/perfbox/service.
        #[arg(long, value_name = "PUBKEY")]
        key: Option<PathBuf>,
    },
    /// Make the receipt signing key pair in the state dir, unless it is there (run as the
    /// service user: the secret key is readable only by its owner).
    Keygen {
        /// The service's state dir.
        #[arg(
            long,
            env = "PERFBOX_STATE_DIR",
            default_value = "/var/lib/perfbox/service"
        )]
        state_dir: PathBuf,
    },
    /// API tokens: `new NAME` makes one; `hash NAME` reads one from stdin. Both print the
    /// `[[tokens]]` lines for the config, which keep only the token's SHA-256.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// (internal) Print the allocated bytes and entries below DIR: how the service measures what
    /// a build's RUN steps wrote, run inside the build daemon's user namespace.
    #[command(hide = true)]
    MeasureTree {
        /// The directory.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Make a fresh token (256 random bits): the token on stdout's first line, then the config
    /// lines.
    New {
        /// The owner name its jobs are filed under.
        name: String,
    },
    /// The config lines for an existing token, read from stdin.
    Hash {
        /// The owner name its jobs are filed under.
        name: String,
    },
}

/// `perfbox token new|hash`.
fn token_command(action: TokenAction) -> Result<()> {
    use base64::Engine;
    use sha2::Digest;
    let (name, token, fresh) = match action {
        TokenAction::New { name } => {
            let mut bytes = [0u8; 32];
            getrandom::getrandom(&mut bytes)
                .map_err(|e| anyhow::anyhow!("no randomness from the kernel: {e}"))?;
            let t = format!(
                "pbx_{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
            );
            (name, t, true)
        }
        TokenAction::Hash { name } => {
            let mut t = String::new();
            std::io::stdin().read_line(&mut t)?;
            (name, t.trim().to_owned(), false)
        }
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
    {
        bail!("a token name is 1-64 of A-Z a-z 0-9 . _ @ -, got {name:?}");
    }
    if token.len() < 8 {
        bail!("a token must be at least 8 characters");
    }
    let sha = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    if fresh {
        println!("{token}");
        eprintln!(
            "# the token above is shown once and stored nowhere: give it to {name}.\n\
             # Add these lines to the config (/etc/perfbox/config.toml), then restart perfbox:"
        );
    }
    println!("[[tokens]]\nname = \"{name}\"\nsha256 = \"{sha}\"");
    Ok(())
}

/// `perfbox serve`'s arguments: `--config FILE`, and a flag for each option of
/// [`perfbox::config::OPTIONS`] that has one (flags override the file and the environment).
struct ServeArgs {
    config: Option<PathBuf>,
    flags: Vec<(&'static str, String)>,
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let flags = perfbox::config::OPTIONS
            .iter()
            .filter_map(|o| Some((o.path, m.get_one::<String>(o.flag?)?.clone())))
            .collect();
        Ok(Self {
            config: m.get_one::<PathBuf>("config").cloned(),
            flags,
        })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let mut cmd = cmd.arg(
            clap::Arg::new("config")
                .long("config")
                .short('c')
                .value_parser(clap::value_parser!(PathBuf))
                .help("Config file (default: /etc/perfbox/config.toml if it exists)"),
        );
        for o in perfbox::config::OPTIONS {
            if let Some(flag) = o.flag {
                let env = o.env.map(|e| format!(" and {e}")).unwrap_or_default();
                cmd = cmd.arg(clap::Arg::new(flag).long(flag).help(format!(
                    "Option `{}` (overrides the config file{env})",
                    o.path
                )));
            }
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Args)]
struct ClientArgs {
    /// perfbox service URL.
    #[arg(long, env = "PERFBOX_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token.
    #[arg(long, env = "PERFBOX_TOKEN")]
    token: Option<String>,
    /// Trust this CA certificate (PEM) for an https:// URL, besides the system's.
    #[arg(long, env = "PERFBOX_CACERT", value_name = "PEM")]
    cacert: Option<PathBuf>,
}

impl ClientArgs {
    fn request(&self, method: reqwest::Method, path: &str) -> Result<reqwest::RequestBuilder> {
        let mut client = reqwest::Client::builder();
        if let Some(path) = &self.cacert {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read --cacert {}", path.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("--cacert {}: not PEM certificates", path.display()))?
            {
                client = client.add_root_certificate(cert);
            }
        }
        let req = client
            .build()
            .context("cannot set up the HTTP client")?
            .request(method, format!("{}{path}", self.url.trim_end_matches('/')));
        Ok(match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        })
    }

    async fn json(&self, path: &str) -> Result<serde_json::Value> {
        let resp = self
            .request(reqwest::Method::GET, path)?
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.url))?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .context("the service answered with something that is not JSON")?;
        if !status.is_success() {
            bail!("{status}: {}", body["error"].as_str().unwrap_or("error"));
        }
        Ok(body)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::MeasureTree { dir } => {
            let u = perfbox::sandbox::build_writes::measure_tree(&dir)
                .with_context(|| format!("cannot measure {}", dir.display()))?;
            println!("{} {}", u.bytes, u.entries);
            Ok(())
        }
        Command::Submit {
            dockerfile,
            wait,
            build_args,
            target,
            dataset,
            idempotency_key,
            client,
        } => {
            let extra = SubmitExtra {
                target,
                dataset,
                idempotency_key,
            };
            submit(&dockerfile, wait, &build_args, extra, &client).await
        }
        Command::Audit {
            ids,
            all,
            since,
            json,
            verbose,
            client,
        } => {
            let sel = audit_cmd::Selection { ids, all, since };
            if !audit_cmd::audit(sel, json, verbose, &client).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Receipt { id, client } => audit_cmd::receipt(id, &client).await,
        Command::Verify { receipt, key } => {
            let key = key.unwrap_or_else(audit_cmd::default_key);
            if !audit_cmd::verify(&receipt, &key)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Keygen { state_dir } => audit_cmd::keygen(&state_dir),
        Command::Token { action } => token_command(action),
        Command::Status { id, client } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&client.json(&format!("/job/{id}")).await?)?
            );
            Ok(())
        }
        Command::Spec { id, client } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&client.json(&format!("/job/{id}/spec")).await?)?
            );
            Ok(())
        }
        Command::Logs { id, follow, client } => {
            let path = format!("/job/{id}/logs{}", if follow { "?follow=1" } else { "" });
            let resp = client
                .request(reqwest::Method::GET, &path)?
                .send()
                .await
                .context("cannot reach the service")?;
            if !resp.status().is_success() {
                let status = resp.status();
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                bail!("{status}: {}", body["error"].as_str().unwrap_or("error"));
            }
            let mut stream = resp.bytes_stream();
            let mut out = tokio::io::stdout();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk?).await?;
                out.flush().await?;
            }
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    // Colours only for a terminal: a log file (scripts/services, journald) gets plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "perfbox=info".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cfg = Config::load(args.config.as_deref(), &args.flags)?;
    cfg.validate()?;
    let addr: SocketAddr = cfg
        .bind
        .parse()
        .with_context(|| format!("bind address {:?}", cfg.bind))?;

    // Under systemd with Delegate=yes our own cgroup is ours: move into a leaf, enable the
    // controllers and use it as the parent of job cgroups (see sandbox::cgroups). Only when no
    // parent is configured and we are not root (a root perfbox hands containers to
    // runtime_user, who does not own the unit's cgroup).
    let uid = nix::unistd::geteuid();
    let mut cgroup_parent = cfg.cgroup_parent.clone();
    if cgroup_parent.is_none() && !uid.is_root() {
        match perfbox::sandbox::cgroups::prepare_delegated_v2(uid.as_raw()) {
            Ok(Some(parent)) => {
                tracing::info!(%parent, "cgroup v2: using the delegated service cgroup for jobs");
                cgroup_parent = Some(parent);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("cgroup v2 delegation not usable: {e}"),
        }
    }
    let sandbox = Sandbox::new(SandboxConfig {
        runtime: cfg.runtime,
        runtime_user: cfg.runtime_user.clone(),
        limits: cfg.limits.clone(),
        cgroup_parent,
        seccomp_profile: None,
    })
    .context("sandbox")?;
    tracing::info!(runtime = %cfg.runtime, cgroups = sandbox.cgroups().version(), "sandbox ready");
    let build_addr = match cfg.build_network {
        perfbox::config::BuildNetworkSetting::None => cfg.buildkit_addr.clone(),
        perfbox::config::BuildNetworkSetting::Isolated => cfg.buildkit_net_addr.clone(),
    };
    let buildkit = match &cfg.buildkit_tls {
        Some(tls) => BuildkitClient::connect_tls(&build_addr, tls).await,
        None => BuildkitClient::connect(&build_addr).await,
    }
    .context("buildkit client")?
    .with_registry_credentials(cfg.registry_credentials());
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state dir {}", cfg.state_dir.display()))?;
    let store: Arc<dyn perfbox::jobs::Store> = match &cfg.database_url {
        Some(url) => Arc::new(PgStore::open(url).context("job database (PostgreSQL)")?),
        None => {
            Arc::new(SqliteStore::open(&cfg.state_dir.join("jobs.db")).context("job database")?)
        }
    };
    let build_cgroups = build_cgroups_for(&cfg, buildkit.addr());
    let jobs = JobService::start(Deps {
        cfg: cfg.clone(),
        store,
        builder: Arc::new(buildkit),
        runner: Arc::new(sandbox),
        build_cgroups,
    })
    .await
    .context("job service")?;
    // TLS first: a certificate that cannot be read stops the start, before any job is touched.
    let tls = match cfg.tls.paths() {
        Some((cert, key)) => Some(ApiTls::new(cert, key).context("[tls]")?),
        None => None,
    };
    if let Some(warning) = cfg.exposure_warning() {
        tracing::warn!("{warning}");
    }
    for t in cfg.tokens.iter().filter(|t| t.token.is_some()) {
        tracing::warn!(
            name = %t.name,
            "a token is kept in clear in the config: replace it with its sha256 (`perfbox token hash {}`)",
            t.name
        );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    if let Some(tls) = tls.clone() {
        // SIGHUP: read the certificate and key again (renewals); running jobs and open
        // connections are not touched, and a bad pair keeps the one in force.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Err(e) => tracing::error!("SIGHUP: {e}; the certificate in force stays"),
                }
            }
        });
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, state_dir = %cfg.state_dir.display(), "perfbox listening");
    let opts = ServeOptions {
        header_timeout: Duration::from_secs(cfg.http.header_timeout_secs),
        request_timeout: Duration::from_secs(cfg.http.request_timeout_secs),
        max_connections: cfg.http.max_connections,
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
    };
    perfbox::api::serve::serve(listener, perfbox::api::router(jobs), tls, &opts, shutdown).await?;
    Ok(())
}

/// `perfbox submit`'s options beyond the file and its build args.
struct SubmitExtra {
    target: Option<String>,
    dataset: Option<String>,
    idempotency_key: Option<String>,
}

async fn submit(
    path: &PathBuf,
    wait: bool,
    build_args: &[String],
    extra: SubmitExtra,
    client: &ClientArgs,
) -> Result<()> {
    let mut form = reqwest::multipart::Form::new();
    if path.is_dir() {
        // The directory as a tar (links kept as links, never followed), its Dockerfile inside.
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        tar.append_dir_all(".", path)
            .with_context(|| format!("cannot pack {}", path.display()))?;
        let archive = tar.into_inner()?;
        form = form.part(
            "context",
            reqwest::multipart::Part::bytes(archive).file_name("context.tar"),
        );
    } else {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "Dockerfile".into());
        form = form.part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(name),
        );
    }
    for arg in build_args {
        form = form.text("build_arg", arg.clone());
    }
    if let Some(t) = extra.target {
        form = form.text("target", t);
    }
    if let Some(d) = extra.dataset {
        form = form.text("dataset", d);
    }
    let mut req = client.request(reqwest::Method::POST, "/job/build")?;
    if let Some(k) = &extra.idempotency_key {
        req = req.header("idempotency-key", k);
    }
    let resp = req
        .multipart(form)
        .send()
        .await
        .context("cannot reach the service")?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        bail!("{status}: {}", body["error"].as_str().unwrap_or("error"));
    }
    let id = body["id"].as_i64().context("no id in the answer")?;
    if !wait {
        println!("{id}");
        return Ok(());
    }
    eprintln!("job {id} submitted");
    let mut last = String::new();
    loop {
        // The service answers as soon as the job ends (or after a second, to show progress).
        let p = client
            .json(&format!("/job/performance/{id}?wait=1"))
            .await?;
        let st = p["status"].as_str().unwrap_or("").to_string();
        if st != last {
            let extra = p["info"]
                .as_str()
                .map(|i| format!(" ({i})"))
                .unwrap_or_default();
            eprintln!("job {id}: {st}{extra}");
            last = st.clone();
        }
        match st.as_str() {
            "queued" | "building" | "running" => {}
            "succeeded" => {
                println!("{}", p["perf"]);
                return Ok(());
            }
            _ => bail!("job {id} {st}: {}", p["error"].as_str().unwrap_or("")),
        }
    }
}
