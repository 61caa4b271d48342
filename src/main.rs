//! The `flowbus` command: argument parsing and wiring only; the work is in
//! `flowbus-runtime` and `flowbus-nodes`, and the admin-API client in [`client`].

mod client;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use flowbus_runtime::activity::{NewEntry, Severity};
use flowbus_runtime::admin;
use flowbus_runtime::config::Config;

/// Counts bytes per thread, for the scripts' memory budget (`flowbus_runtime::memory`).
#[global_allocator]
static ALLOC: flowbus_runtime::memory::Counting = flowbus_runtime::memory::Counting;
use flowbus_runtime::daemon::{bip, Daemon};
use flowbus_runtime::datadir::DataDir;
use flowbus_runtime::engine::CancellationToken;
use flowbus_runtime::flow::{flow_files, validate, FlowErrors, ValidatedFlow};
use flowbus_runtime::node::{Registry, ValidateCtx};
use flowbus_runtime::services::Services;

#[derive(Parser)]
#[command(
    name = "flowbus",
    version,
    about = "An integration-bus flow runtime: JSON message flows, Rhai transforms, MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run flows in the foreground until SIGINT or SIGTERM.
    Run {
        /// The runtime configuration (default: ./flowbus.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Flow files or directories (default: the configuration's `flows`).
        #[arg(long = "flows")]
        flows: Vec<PathBuf>,
        /// Admin API listen address (overrides the configuration).
        #[arg(long)]
        admin: Option<String>,
        /// Data directory (overrides the configuration).
        #[arg(long = "data-dir")]
        data_dir: Option<PathBuf>,
        /// How long a graceful shutdown may take (overrides `[daemon] shutdown_timeout`).
        #[arg(long = "shutdown-timeout", value_parser = humantime_duration)]
        shutdown_timeout: Option<Duration>,
    },
    /// Manage the flows of a running daemon.
    Flows {
        #[command(subcommand)]
        command: FlowsCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the activity log of a running daemon.
    Log {
        /// Only this flow.
        #[arg(long)]
        flow: Option<String>,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// At least this severity: info, warning or error.
        #[arg(long)]
        severity: Option<String>,
        /// Only this message number (BIP12096 or 12096).
        #[arg(long)]
        number: Option<String>,
        /// Only entries since a time (2026-11-22T10:00:00Z) or a duration back (10m).
        #[arg(long)]
        since: Option<String>,
        /// At most this many past entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Keep printing new entries as they come.
        #[arg(long, short)]
        follow: bool,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the statistics of a running daemon.
    Stats {
        /// The JSON the API returns.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check flow files (and their scripts); exit 0 when all are valid, 1 otherwise.
    Validate {
        /// Flow files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The runtime configuration, for server names (default: ./flowbus.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check every MQTT server the flows use: reachability, TLS, authentication, the broker's
    /// QoS limit, and per node the requested QoS, the limit, the verdict and the fix. Exit 1 on
    /// any mismatch or unreachable server.
    Doctor {
        /// The runtime configuration (default: ./flowbus.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Flow files or directories (default: the configuration's `flows`).
        #[arg(long = "flows")]
        flows: Vec<PathBuf>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// How long each connection attempt may take.
        #[arg(long, default_value = "5s", value_parser = humantime_duration)]
        timeout: Duration,
    },
    /// Draw a flow's graph.
    Graph {
        /// The flow file.
        flow: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Dot)]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// The runtime configuration, for server names.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The daemon's admin API (URL or host:port; default: admin.listen of the configuration).
    #[arg(long, global = true)]
    admin: Option<String>,
    /// The runtime configuration, for the default address and where the token is (default:
    /// ./flowbus.toml when it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The daemon's data directory, where it keeps the admin token (overrides the
    /// configuration's, as `flowbus run --data-dir` does).
    #[arg(long = "data-dir", global = true)]
    data_dir: Option<PathBuf>,
}

impl AdminArgs {
    fn connect(&self) -> Result<client::Admin> {
        let mut config = load_config(self.config.as_deref())?;
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        Ok(client::Admin::new(self.admin.as_deref(), &config))
    }
}

#[derive(Subcommand)]
enum FlowsCommand {
    /// List the flows with their state.
    List {
        /// The JSON the API returns.
        #[arg(long)]
        json: bool,
    },
    /// Deploy (or redeploy) a flow file: validated by the daemon, then started.
    Deploy {
        /// The flow file.
        file: PathBuf,
        /// The flow name (default: the file's "name", else its stem).
        #[arg(long)]
        name: Option<String>,
    },
    /// Start a stopped or failed flow.
    Start {
        /// The flow name.
        name: String,
    },
    /// Stop a flow (it stays deployed).
    Stop {
        /// The flow name.
        name: String,
    },
    /// Stop a flow and remove it (its file is moved to <data_dir>/removed).
    Remove {
        /// The flow name.
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Dot,
    Svg,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime_parse(s)
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    flowbus_runtime::node::parse_duration_value(&serde_json::Value::String(s.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { paths, config } => cmd_validate(&paths, config.as_deref()),
        Command::Doctor {
            config,
            flows,
            json,
            timeout,
        } => cmd_doctor(config.as_deref(), flows, json, timeout),
        Command::Graph {
            flow,
            format,
            output,
            config,
        } => cmd_graph(&flow, format, output.as_deref(), config.as_deref()),
        Command::Run {
            config,
            flows,
            admin,
            data_dir,
            shutdown_timeout,
        } => cmd_run(config.as_deref(), flows, admin, data_dir, shutdown_timeout),
        Command::Flows { command, admin } => admin.connect().and_then(|a| match command {
            FlowsCommand::List { json } => client::flows_list(&a, json),
            FlowsCommand::Deploy { file, name } => client::flows_deploy(&a, &file, name.as_deref()),
            FlowsCommand::Start { name } => client::flows_action(&a, "start", &name),
            FlowsCommand::Stop { name } => client::flows_action(&a, "stop", &name),
            FlowsCommand::Remove { name } => client::flows_remove(&a, &name),
        }),
        Command::Log {
            flow,
            node,
            severity,
            number,
            since,
            limit,
            follow,
            json,
            admin,
        } => admin.connect().and_then(|a| {
            client::log(
                &a,
                client::LogArgs {
                    flow,
                    node,
                    severity,
                    number,
                    since,
                    limit,
                    follow,
                    json,
                },
            )
        }),
        Command::Stats { json, admin } => admin.connect().and_then(|a| client::stats(&a, json)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None if Path::new("flowbus.toml").is_file() => Ok(Config::load(Path::new("flowbus.toml"))?),
        None => Ok(Config::default()),
    }
}

fn cmd_validate(paths: &[PathBuf], config: Option<&Path>) -> Result<ExitCode> {
    let config = Arc::new(load_config(config)?);
    let registry = flowbus_nodes::registry();
    let services = Arc::new(Services::default());
    let files = flow_files(paths).map_err(|e| anyhow::anyhow!("{e}"))?;
    if files.is_empty() {
        bail!(
            "no flow files (*.json) found under {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut bad = 0;
    let mut err = std::io::stderr().lock();
    for f in &files {
        match flowbus_runtime::flow::load_flow(f, &registry, config.clone(), services.clone()) {
            Ok(flow) => println!("ok: {} (flow '{}')", f.display(), flow.name()),
            Err(errors) => {
                bad += 1;
                writeln!(err, "{errors}")?;
            }
        }
    }
    if bad > 0 {
        writeln!(err, "{bad} of {} flow file(s) invalid", files.len())?;
        Ok(ExitCode::from(1))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

fn validated(flow: &Path, config: Option<&Path>, registry: &Registry) -> Result<ValidatedFlow> {
    let config = load_config(config)?;
    let text =
        std::fs::read_to_string(flow).with_context(|| format!("cannot read {}", flow.display()))?;
    let ctx = ValidateCtx {
        servers: config.servers.keys().cloned().collect(),
    };
    validate(flow, &text, registry, &ctx).map_err(|e| anyhow::anyhow!("{}", FlowErrors(e)))
}

fn cmd_graph(
    flow: &Path,
    format: Format,
    output: Option<&Path>,
    config: Option<&Path>,
) -> Result<ExitCode> {
    let registry = flowbus_nodes::registry();
    let v = validated(flow, config, &registry)?;
    let dot = to_dot(&v, &registry);
    let bytes = match format {
        Format::Dot => dot.into_bytes(),
        Format::Svg => render_svg(&dot)?,
    };
    match output {
        Some(p) => {
            std::fs::write(p, bytes).with_context(|| format!("cannot write {}", p.display()))?
        }
        None => std::io::stdout().write_all(&bytes)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn to_dot(v: &ValidatedFlow, registry: &Registry) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut s = format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n", esc(&v.name));
    for ix in v.graph.node_indices() {
        let n = &v.graph[ix];
        let input = registry
            .get(&n.type_name)
            .is_some_and(|k| k.spec().inputs.is_empty());
        let style = if input {
            ", style=\"rounded,bold\""
        } else {
            ""
        };
        s.push_str(&format!(
            "  \"{}\" [label=\"{}\\n({})\"{}];\n",
            esc(&n.id),
            esc(&n.id),
            esc(&n.type_name),
            style
        ));
    }
    for e in v.graph.edge_indices() {
        if let Some((a, b)) = v.graph.edge_endpoints(e) {
            let t = &v.graph[e].from_terminal;
            let color = if matches!(t.as_str(), "Failure" | "Catch") {
                ", color=red, fontcolor=red"
            } else {
                ""
            };
            s.push_str(&format!(
                "  \"{}\" -> \"{}\" [label=\"{}\"{}];\n",
                esc(&v.graph[a].id),
                esc(&v.graph[b].id),
                esc(t),
                color
            ));
        }
    }
    s.push_str("}\n");
    s
}

fn render_svg(dot: &str) -> Result<Vec<u8>> {
    use std::process::{Command, Stdio};
    let mut child = match Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("--format svg needs Graphviz's 'dot', which is not installed; install it (apt-get install graphviz) or use --format dot")
        }
        Err(e) => bail!("cannot run Graphviz 'dot': {e}"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(dot.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "Graphviz 'dot' failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn cmd_doctor(
    config: Option<&Path>,
    flows: Vec<PathBuf>,
    json: bool,
    timeout: Duration,
) -> Result<ExitCode> {
    let config = load_config(config)?;
    let paths = if flows.is_empty() {
        config.flows.clone()
    } else {
        flows
    };
    let files = flow_files(&paths).map_err(|e| anyhow::anyhow!("{e}"))?;
    let registry = flowbus_nodes::registry();
    let ctx = ValidateCtx {
        servers: config.servers.keys().cloned().collect(),
    };
    let mut valid = Vec::new();
    let mut invalid = 0;
    for f in &files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        match validate(f, &text, &registry, &ctx) {
            Ok(v) => valid.push(v),
            Err(e) => {
                invalid += 1;
                eprintln!("{}", FlowErrors(e));
            }
        }
    }
    if invalid > 0 {
        bail!("{invalid} flow file(s) are invalid; fix them first (flowbus validate)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = rt
        .block_on(flowbus_nodes::doctor::run(&config, &valid, timeout))
        .map_err(|e| anyhow::anyhow!(e))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", flowbus_nodes::doctor::render(&report));
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn cmd_run(
    config: Option<&Path>,
    flows: Vec<PathBuf>,
    admin: Option<String>,
    data_dir: Option<PathBuf>,
    shutdown_timeout: Option<Duration>,
) -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    let mut config = load_config(config)?;
    if !flows.is_empty() {
        config.flows = flows;
    }
    if let Some(a) = admin {
        config.admin.listen = a;
    }
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    if let Some(t) = shutdown_timeout {
        config.daemon.shutdown_timeout.0 = t;
    }
    let deadline = config.daemon.shutdown_timeout.0;
    if let Some(why) = config.admin.refusal() {
        bail!("{why}");
    }
    // Whatever the daemon (or the MQTT library under it) creates is its user's alone: the
    // data directory holds payloads in flight and the admin token.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    raise_open_file_limit();
    // One daemon per data directory: taken before anything in it is read or written.
    let data = DataDir::open(&config.data_dir)?;
    // Refuse to start without the token the configuration asks for, rather than serve an
    // open API.
    let (auth, token_source) = admin::auth_from_config(&config, &data)?;
    let services = Arc::new(Services::open(&config)?);
    // The activity log echoes its entries to standard error.
    let daemon_note = |severity: Severity, message: String| {
        services.activity.record(NewEntry::new(
            severity,
            bip::DAEMON,
            "Daemon",
            "",
            "",
            message,
        ));
    };
    if !data.tightened().is_empty() {
        daemon_note(
            Severity::Warning,
            format!(
                "the data directory {} was readable or writable by others; made {} entr{} private (0700 directories, 0600 files): {}",
                config.data_dir.display(),
                data.tightened().len(),
                if data.tightened().len() == 1 { "y" } else { "ies" },
                data.tightened()
                    .iter()
                    .take(5)
                    .map(|(p, m)| format!("{} was {m:o}", p.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    match token_source {
        admin::TokenSource::Generated => daemon_note(
            Severity::Info,
            format!(
                "generated the admin API token into {} (0600); flowbus commands run with this configuration read it from there",
                data.path().join(flowbus_runtime::datadir::TOKEN_FILE).display()
            ),
        ),
        admin::TokenSource::Off => daemon_note(
            Severity::Warning,
            format!(
                "the admin API on {} has no authentication (admin.auth = \"none\"): every program and user on this machine can deploy, stop and remove flows",
                config.admin.listen
            ),
        ),
        admin::TokenSource::Env | admin::TokenSource::File => {}
    }
    let api_options = admin::Options::new(&config.admin, auth);
    let api_limits = admin::Limits::new(&config.admin);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    // Scripts may run on the workers too (`instances > 1`): the same stack as input threads.
    rt.thread_stack_size(flowbus_runtime::input_task::STACK_SIZE);
    if let Some(n) = config.daemon.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        let listener = admin::bind(&config.admin.listen).await?;
        let addr = listener.local_addr()?;
        let daemon = Daemon::with_services(config, flowbus_nodes::registry(), services.clone());
        let failed = daemon.start_all().await;
        for e in &failed {
            eprintln!("{e}");
        }
        let stop_api = CancellationToken::new();
        let api = {
            let stop = stop_api.clone();
            let router = admin::router(daemon.clone(), api_options);
            tokio::spawn(async move {
                if let Err(e) = admin::serve(listener, router, api_limits, async move {
                    stop.cancelled().await
                })
                .await
                {
                    tracing::error!("the admin API stopped: {e}");
                }
            })
        };
        let watcher = {
            let d = daemon.clone();
            tokio::spawn(async move { d.watch().await })
        };
        let running = daemon.running().len();
        services.activity.record(NewEntry::new(
            Severity::Info,
            bip::DAEMON,
            "Daemon",
            "",
            "",
            format!(
                "flowbus {} running {running} flow(s) ({} invalid); admin API on http://{addr}",
                env!("CARGO_PKG_VERSION"),
                failed.len()
            ),
        ));
        tracing::info!("SIGINT or SIGTERM stops flowbus gracefully, SIGUSR1 prints statistics");
        wait_for_shutdown(&daemon).await?;
        services.activity.record(NewEntry::new(
            Severity::Info,
            bip::DAEMON,
            "Daemon",
            "",
            "",
            format!(
                "flowbus stopping (deadline {})",
                flowbus_runtime::time::human(deadline)
            ),
        ));
        let late = daemon.shutdown(deadline).await;
        if !late.is_empty() {
            tracing::warn!(
                "flows {} did not stop within {}",
                late.join(", "),
                flowbus_runtime::time::human(deadline)
            );
        }
        let _ = watcher.await;
        // Open event streams would hold a graceful HTTP shutdown for ever: give them a
        // moment, then close.
        stop_api.cancel();
        let mut api = api;
        if tokio::time::timeout(Duration::from_secs(1), &mut api)
            .await
            .is_err()
        {
            api.abort();
        }
        services.activity.flush();
        println!("{}", serde_json::to_string_pretty(&daemon.stats())?);
        // The lock on the data directory is held to the end.
        drop(data);
        Ok(ExitCode::SUCCESS)
    })
}

/// Raises the soft limit on open files to the hard one: MQTT connections, in-flight logs and
/// admin connections all take descriptors, and the default soft limit (often 1024) is far
/// below what the system allows.
fn raise_open_file_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

async fn wait_for_shutdown(daemon: &Daemon) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = usr1.recv() => println!("{}", serde_json::to_string_pretty(&daemon.stats())?),
        }
    }
}
