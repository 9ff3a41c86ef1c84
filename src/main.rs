//! The `switchyard` binary: command line, logging, and a call into the library.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use switchyard::config::{FileConfig, LogFormat};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "An API gateway that lives on HashiCorp Consul"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway against a Consul agent.
    Run(RunArgs),
    /// Run the embedded Consul-compatible dev registry alone.
    Registry(RegistryArgs),
    /// Quick start: the dev registry, demo services, example routes and the gateway in one go.
    Dev(DevArgs),
    /// A demo upstream: an HTTP echo service that can register itself in Consul.
    Echo(EchoArgs),
    /// Mint an API key: prints the key (once) and the KV document that stores its hash.
    MintKey(MintKeyArgs),
    /// The state of a running gateway (routes, traffic, instances, Consul) from its admin
    /// listener. Exit status 0 healthy, 2 not ready or stale Consul data, 1 unreachable.
    Status(StatusArgs),
    /// Validate a configuration file and exit.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
}

/// Settings shared by `run` and `dev`. Flags override the config file.
#[derive(Args, Clone)]
struct GatewayArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Proxy listener address.
    #[arg(long)]
    listen: Option<String>,
    /// Admin listener address.
    #[arg(long)]
    admin: Option<String>,
    /// Log format.
    #[arg(long, value_enum, env = "SWITCHYARD_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// OTLP endpoint request spans are exported to (`tracing.otlp_endpoint`).
    #[arg(long, env = "SWITCHYARD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[derive(Args)]
struct MintKeyArgs {
    /// Consumer name, sent upstream in `X-Consumer`.
    #[arg(long)]
    consumer: String,
    /// A scope the key carries (repeatable).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// KV key name below `<kv-prefix>apikeys/` (default: consumer plus a random suffix).
    #[arg(long)]
    id: Option<String>,
    /// KV prefix, for the printed command.
    #[arg(long, default_value = "switchyard/")]
    kv_prefix: String,
    /// Consul address, for the printed command.
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = "http://127.0.0.1:8500"
    )]
    consul: String,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Consul agent: `http(s)://host:port` or `host:port`; a comma-separated list names
    /// several agents, in order of preference.
    #[arg(long, env = "CONSUL_HTTP_ADDR")]
    consul: Option<String>,
    /// Consul ACL token.
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the Consul ACL token, read again while running (wins over --token).
    #[arg(long, env = "CONSUL_HTTP_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// KV prefix holding routes/, jwt/ and apikeys/.
    #[arg(long)]
    kv_prefix: Option<String>,
    /// File for the last known state (warm start when Consul is down at boot).
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Do not register the gateway itself in Consul.
    #[arg(long)]
    no_register: bool,
    /// Address (IP or host name) the gateway advertises in its own Consul registration.
    #[arg(long)]
    advertise: Option<String>,
    /// Redis of cluster-scope rate limits (`redis://host:port` or `rediss://`); replaces the
    /// file's `[rate_limit]` Redis settings.
    #[arg(long, env = "SWITCHYARD_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
}

#[derive(Args)]
struct RegistryArgs {
    /// Address to serve the Consul HTTP API on.
    #[arg(long, default_value = "127.0.0.1:8500")]
    listen: String,
    /// Require this ACL token on every request.
    #[arg(long)]
    token: Option<String>,
    /// This registry's datacenter name.
    #[arg(long, default_value = "dc1")]
    datacenter: String,
    /// A WAN peer: `NAME=http://HOST:PORT` of the registry serving datacenter NAME;
    /// `?dc=NAME` is forwarded there. Repeatable.
    #[arg(long = "wan", value_name = "NAME=URL", value_parser = switchyard::devregistry::parse_wan_flag)]
    wan: Vec<(String, String)>,
}

#[derive(Args)]
struct EchoArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    /// Consul service name.
    #[arg(long, default_value = "demo")]
    name: String,
    /// Consul service ID (default: the name and port).
    #[arg(long)]
    id: Option<String>,
    /// Address to advertise in Consul (default: the listen address's IP).
    #[arg(long)]
    advertise: Option<String>,
    /// Register in this Consul agent (`http://host:port`), deregister on exit.
    #[arg(long)]
    register: Option<String>,
    /// Consul ACL token.
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Consul tags.
    #[arg(long = "tag")]
    tags: Vec<String>,
}

#[derive(Args)]
struct StatusArgs {
    /// The gateway's admin listener: `host:port` or `http(s)://host:port`.
    #[arg(long, env = "SWITCHYARD_ADMIN", default_value = "127.0.0.1:9901")]
    admin: String,
    /// Print the admin listener's `/dashboard.json` answer as it came.
    #[arg(long)]
    json: bool,
    /// File holding the admin token (`[admin] token` / `token_file`).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
struct DevArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Address of the embedded registry.
    #[arg(long, default_value = "127.0.0.1:8500")]
    registry_listen: String,
}

fn load_file(args: &GatewayArgs) -> anyhow::Result<FileConfig> {
    let mut file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    if let Some(l) = &args.listen {
        file.proxy.listen = l.clone();
    }
    if let Some(a) = &args.admin {
        file.admin.listen = a.clone();
    }
    if let Some(f) = args.log_format {
        file.log.format = f;
    }
    if let Some(e) = &args.otlp_endpoint {
        file.tracing.otlp_endpoint = Some(e.clone());
    }
    Ok(file)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => {
            let cfg = FileConfig::load(&file)?.validate()?;
            for (name, doc) in &cfg.file.jwt_providers {
                switchyard::auth::jwt::Provider::check(name, doc)?;
            }
            if let Some(tls) = &cfg.file.tls {
                switchyard::tls::Tls::load(tls)?;
            }
            if let Some(a) = &cfg.file.assertion {
                switchyard::assertion::Signer::load(a)?;
            }
            if let Some(u) = &cfg.file.upstream_tls {
                switchyard::upstream_tls::UpstreamTls::load(u)?;
            }
            println!(
                "{}: ok (proxy {}, admin {}, consul {})",
                file.display(),
                cfg.listen,
                cfg.admin_listen,
                cfg.consul_address
            );
            Ok(())
        }
        Command::Run(args) => {
            let mut file = load_file(&args.gateway)?;
            if let Some(c) = args.consul {
                file.consul.address = Some(c);
                file.consul.addresses.clear();
            }
            if let Some(f) = args.token_file {
                file.consul.token_file = Some(f);
                file.consul.token = None;
            } else if let Some(t) = args.token {
                file.consul.token = Some(t);
                file.consul.token_file = None;
            }
            if let Some(p) = args.kv_prefix {
                file.consul.kv_prefix = p;
            }
            if let Some(s) = args.state_file {
                file.consul.state_file = Some(s);
            }
            if args.no_register {
                file.registration.enabled = false;
            }
            if let Some(a) = args.advertise {
                file.registration.address = a;
            }
            if let Some(u) = args.redis_url {
                file.rate_limit.redis_url = Some(u);
                file.rate_limit.redis_cluster_nodes.clear();
                file.rate_limit.redis_sentinel_nodes.clear();
                file.rate_limit.redis_sentinel_master = None;
            }
            let cfg = file.validate()?;
            switchyard::telemetry::init(&cfg.file.log.level, cfg.file.log.format);
            runtime(cfg.file.proxy.worker_threads)?
                .block_on(switchyard::app::run_until_signal(cfg))?;
            Ok(())
        }
        Command::Registry(args) => {
            switchyard::telemetry::init("info", LogFormat::Text);
            let addr = args
                .listen
                .parse()
                .with_context(|| format!("--listen {}", args.listen))?;
            let opts = switchyard::devregistry::RegistryOptions {
                token: args.token,
                datacenter: args.datacenter,
                wan_peers: args.wan,
                ..switchyard::devregistry::RegistryOptions::default()
            };
            runtime(0)?.block_on(switchyard::devregistry::serve_until_signal(addr, opts))?;
            Ok(())
        }
        Command::MintKey(args) => mint_key(args),
        Command::Status(args) => status(args),
        Command::Echo(args) => {
            switchyard::telemetry::init("info", LogFormat::Text);
            runtime(1)?.block_on(echo(args))
        }
        Command::Dev(args) => {
            let mut file = load_file(&args.gateway)?;
            if args.gateway.config.is_none() && args.gateway.listen.is_none() {
                // A laptop quick start: not reachable from the network unless asked.
                file.proxy.listen = "127.0.0.1:8080".into();
            }
            let registry = args
                .registry_listen
                .parse()
                .with_context(|| format!("--registry-listen {}", args.registry_listen))?;
            switchyard::telemetry::init(&file.log.level, file.log.format);
            runtime(0)?.block_on(switchyard::dev::run(file, registry))?;
            Ok(())
        }
    }
}

async fn echo(args: EchoArgs) -> anyhow::Result<()> {
    use switchyard::consul::{ClientSettings, ConsulClient, ServiceCheck, ServiceRegistration};
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let addr = listener.local_addr()?;
    let id = args
        .id
        .unwrap_or_else(|| format!("{}-{}", args.name, addr.port()));
    let shutdown = switchyard::shutdown::Shutdown::new();
    shutdown.trigger_on_signals();
    let _echo = switchyard::devregistry::demo::serve_echo_on(listener, &args.name, &id)?;
    tracing::info!(%addr, %id, "echo service listening");
    let Some(consul) = args.register else {
        shutdown.wait().await;
        return Ok(());
    };
    let mut settings = ClientSettings::new(
        switchyard::config::normalize_consul_address(&consul)
            .map_err(|e| anyhow::anyhow!("--register: {e}"))?,
        std::time::Duration::from_secs(1),
    );
    settings.token = args.token;
    let client = ConsulClient::new(&settings.with_tls_env())?;
    let address = args.advertise.unwrap_or_else(|| addr.ip().to_string());
    let host = if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]")
    } else {
        address.clone()
    };
    let reg = ServiceRegistration {
        id: id.clone(),
        name: args.name,
        port: addr.port(),
        check: Some(ServiceCheck {
            http: format!("http://{host}:{}/health", addr.port()),
            interval: "2s".into(),
            timeout: "2s".into(),
            deregister_critical_service_after: "10m".into(),
        }),
        address,
        tags: args.tags,
        meta: [("demo".to_string(), "true".to_string())].into(),
    };
    // The agent may still be starting (docker-compose): retry for a while.
    let mut tries = 0;
    while let Err(e) = client.agent_service_register(&reg).await {
        tries += 1;
        if tries >= 30 {
            return Err(e.into());
        }
        tracing::warn!(error = %e, "registration failed, retrying");
        tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
    tracing::info!(service = %reg.name, %id, "registered in consul");
    shutdown.wait().await;
    client.agent_service_deregister(&id).await?;
    tracing::info!(%id, "deregistered");
    Ok(())
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    use switchyard::status_cli;
    let token = args
        .token_file
        .as_deref()
        .map(status_cli::read_token)
        .transpose()?;
    let data = runtime(1)?.block_on(status_cli::fetch(&args.admin, token.as_deref()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
    } else {
        print!("{}", status_cli::render(&data, &args.admin));
    }
    if !status_cli::healthy(&data) {
        std::process::exit(status_cli::EXIT_DEGRADED);
    }
    Ok(())
}

fn mint_key(args: MintKeyArgs) -> anyhow::Result<()> {
    use switchyard::auth::api_key::{mint, ApiKeyRecord, APIKEYS_DIR};
    let minted = mint(&args.consumer, args.scopes, args.id);
    let doc = serde_json::to_string(&minted.doc)?;
    // The same checks the gateway applies when it reads the document from KV.
    ApiKeyRecord::compile(
        &minted.id,
        doc.as_bytes(),
        &http::HeaderName::from_static("x-consumer"),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let consul = switchyard::config::normalize_consul_address(&args.consul)
        .map_err(|e| anyhow::anyhow!("--consul: {e}"))?;
    let key_path = format!("{}{APIKEYS_DIR}{}", args.kv_prefix, minted.id);
    println!("API key (shown once; store it now): {}", minted.key);
    println!();
    println!("KV document for {key_path}:");
    println!("{doc}");
    println!();
    println!("Store it:");
    let quoted = doc.replace('\'', "'\\''");
    println!("curl -sf -X PUT --data '{quoted}' {consul}/v1/kv/{key_path}");
    Ok(())
}

/// The runtime: one event loop on this thread for `workers = 1` (no work-stealing cost,
/// like one nginx worker), else a work-stealing pool (`0` = one worker per core).
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 0 {
            b.worker_threads(workers);
        }
        b
    };
    b.enable_all().build().context("starting the tokio runtime")
}
