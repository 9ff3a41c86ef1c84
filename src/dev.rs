//! `switchyard dev`: the quick start in one process. The embedded registry, two demo echo
//! instances with HTTP checks, example routes (one public, one behind an HS256 JWT provider
//! whose secret is generated at start) and the gateway, plus a printed guide of what to curl.
//!
//! Everything goes through the same paths as production: routes and the provider are KV
//! documents, the demo instances are registered services, the gateway is `app::start`.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::app::{self, AppError, AppHandle};
use crate::config::{ConfigError, FileConfig};
use crate::devregistry::demo::{self, DemoInstance, DEMO_SERVICE};
use crate::devregistry::{Registry, RegistryError, RegistryOptions};
use crate::shutdown::Shutdown;

/// Name of the demo JWT provider (`<prefix>jwt/demo`) and of the routes.
const PROVIDER: &str = "demo";
const ISSUER: &str = "https://id.switchyard.dev";
const AUDIENCE: &str = "demo";
const SUBJECT: &str = "demo-user";
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// How long start waits for the first snapshot before printing the guide anyway.
const READY_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("dev registry: {0}")]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    App(#[from] AppError),
    #[error("demo JWT secret: {0}")]
    Secret(std::io::Error),
    #[error("demo token: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
}

/// A running quick start.
pub struct Dev {
    pub registry: Registry,
    pub demo: Vec<DemoInstance>,
    pub gateway: AppHandle,
    /// A bearer token the `/secure` route accepts (HS256, `sub` demo-user, 1 h).
    pub token: String,
    /// Private directory holding the generated HMAC secret; removed on stop.
    secret_dir: PathBuf,
    admin_token: Option<String>,
}

/// `switchyard dev`: starts everything, prints the guide, runs until SIGINT/SIGTERM.
pub async fn run(file: FileConfig, registry_addr: SocketAddr) -> Result<(), DevError> {
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    let dev = start(file, registry_addr, shutdown.clone()).await?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", dev.guide());
    let _ = out.flush();
    drop(out);
    shutdown.wait().await;
    dev.stop().await;
    tracing::info!("switchyard dev stopped");
    Ok(())
}

/// Starts the registry, the demo services, the example routes and the gateway (on the
/// listeners `file` names) and waits (bounded) for the gateway's first snapshot.
pub async fn start(
    mut file: FileConfig,
    registry_addr: SocketAddr,
    shutdown: Shutdown,
) -> Result<Dev, DevError> {
    let registry =
        Registry::start(registry_addr, RegistryOptions::default()).map_err(|source| {
            RegistryError::Bind {
                addr: registry_addr,
                source,
            }
        })?;
    let demo = demo::start_demo_services(&registry).await?;
    let (secret_dir, secret_file, secret) = write_secret().map_err(DevError::Secret)?;

    let prefix = file.consul.kv_prefix.clone();
    let provider = json!({
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["HS256"],
        "keys": [{"kid": PROVIDER, "secret_file": secret_file}],
    });
    registry.kv_put(&format!("{prefix}jwt/{PROVIDER}"), provider.to_string())?;
    let public = json!({"service": DEMO_SERVICE, "path_prefix": "/demo"});
    registry.kv_put(&format!("{prefix}routes/demo"), public.to_string())?;
    let secure = json!({
        "service": DEMO_SERVICE,
        "path_prefix": "/secure",
        "auth": {"jwt": [PROVIDER]},
    });
    registry.kv_put(&format!("{prefix}routes/secure"), secure.to_string())?;

    file.consul.address = Some(registry.url());
    file.consul.addresses.clear();
    let admin_token = file.admin.token.clone();
    let cfg = file.validate()?;
    let listeners = app::bind_listeners(&cfg).await?;
    let gateway = app::start(cfg, listeners, shutdown).await?;
    if !gateway.first_snapshot(READY_WAIT).await {
        tracing::warn!("the gateway is not ready yet; the routes will serve once it is");
    }
    let token = mint_token(&secret)?;
    Ok(Dev {
        registry,
        demo,
        gateway,
        token,
        secret_dir,
        admin_token,
    })
}

impl Dev {
    /// What is running where, and the exact commands to try.
    pub fn guide(&self) -> String {
        let proxy = format!("http://{}", reachable(self.gateway.proxy_addr()));
        let admin = format!("http://{}", reachable(self.gateway.admin_addr()));
        let registry = self.registry.url();
        let auth = match &self.admin_token {
            Some(t) => format!("-H 'Authorization: Bearer {t}' "),
            None => String::new(),
        };
        let instances: Vec<String> = self
            .demo
            .iter()
            .map(|d| format!("{} http://{}", d.id, d.addr))
            .collect();
        let mut g = String::new();
        let mut line = |s: String| {
            g.push_str(&s);
            g.push('\n');
        };
        line("Switchyard dev is running; Ctrl-C stops everything.".into());
        line(String::new());
        line(format!("  gateway           {proxy}"));
        line(format!("  admin             {admin}"));
        line(format!("  registry (Consul) {registry}"));
        line(format!("  demo instances    {}", instances.join(", ")));
        line(String::new());
        line("Demo token (HS256, sub demo-user, valid 1 h):".into());
        line(format!("  export TOKEN={}", self.token));
        line(String::new());
        line("Try it:".into());
        line(format!(
            "  curl {proxy}/demo/hello                                # public: 200 from demo-1 or demo-2"
        ));
        line(format!(
            "  curl -H \"Authorization: Bearer $TOKEN\" {proxy}/secure/hi   # JWT-protected: 200"
        ));
        line(format!(
            "  curl -i {proxy}/secure/hi                              # no token: 401"
        ));
        if let Some(first) = self.demo.first() {
            let toggle = format!("http://{}/_demo/health", first.addr);
            line(String::new());
            line(format!(
                "Fail an instance and watch failover ({} stops answering its health check):",
                first.id
            ));
            line(format!("  curl -X PUT '{toggle}?status=fail'"));
            line(format!(
                "  for i in 1 2 3 4; do curl -s {proxy}/demo/hello | grep -o '\"instance\":\"[^\"]*\"'; done"
            ));
            line(format!(
                "  curl -X PUT '{toggle}?status=ok'      # back in rotation"
            ));
            line(format!(
                "  curl -X PUT '{registry}/v1/agent/service/maintenance/{}?enable=true&reason=demo'   # or: maintenance mode",
                first.id
            ));
        }
        line(String::new());
        line("Look inside:".into());
        line(format!("  open {admin}/ in a browser: the live dashboard"));
        line("  switchyard status --admin ".to_string() + admin.trim_start_matches("http://"));
        line(format!("  curl {auth}{admin}/routes"));
        line(format!("  curl {auth}{admin}/upstreams"));
        line(format!("  curl {auth}{admin}/metrics"));
        line(format!(
            "  curl '{registry}/v1/health/service/{DEMO_SERVICE}?pretty'"
        ));
        if let Some(r) = self.gateway.registration() {
            line(format!(
                "  curl '{registry}/v1/agent/service/{}?pretty'   # the gateway registers itself",
                r.id()
            ));
        }
        g
    }

    /// Stops the gateway (it deregisters first), the demo instances, then the registry.
    pub async fn stop(self) {
        self.gateway.stop().await;
        drop(self.demo);
        self.registry.stop().await;
        if let Err(e) = std::fs::remove_dir_all(&self.secret_dir) {
            tracing::warn!(error = %e, dir = %self.secret_dir.display(), "cannot remove the demo secret");
        }
    }
}

/// An address a local curl can reach: a wildcard bind is reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}

/// A fresh 256-bit HMAC secret (hex), in a private directory only this user can read:
/// provider documents never carry secrets, they name a file.
fn write_secret() -> std::io::Result<(PathBuf, PathBuf, String)> {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    let dir = std::env::temp_dir().join(format!("switchyard-dev-{}", uuid::Uuid::new_v4()));
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(&dir)?;
    let file = dir.join("jwt-secret");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(&file)?.write_all(secret.as_bytes())?;
    Ok((dir, file, secret))
}

fn mint_token(secret: &str) -> Result<String, jsonwebtoken::errors::Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "iat": now,
        "exp": now + TOKEN_TTL.as_secs(),
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(PROVIDER.to_string());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_bind_is_shown_as_loopback() {
        assert_eq!(
            reachable("0.0.0.0:8080".parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            reachable("[::]:1".parse().unwrap()),
            "[::1]:1".parse().unwrap()
        );
        let a: SocketAddr = "127.0.0.2:5".parse().unwrap();
        assert_eq!(reachable(a), a);
    }

    #[test]
    fn the_secret_is_private_and_the_token_carries_the_demo_claims() {
        let (dir, file, secret) = write_secret().unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
        let token = mint_token(&secret).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_audience(&[AUDIENCE]);
        v.set_issuer(&[ISSUER]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &v,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], SUBJECT);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_docker_compose_provider_accepts_the_same_tokens_as_the_dev_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/jwt/demo.json");
        let mut doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(doc["issuer"], ISSUER);
        assert_eq!(doc["audiences"], json!([AUDIENCE]));
        assert_eq!(doc["keys"][0]["kid"], PROVIDER);
        // The file names its secret by env; check the rest with a secret file instead.
        let (dir, file, _) = write_secret().unwrap();
        doc["keys"][0] = json!({"kid": PROVIDER, "secret_file": file});
        crate::auth::jwt::Provider::check(PROVIDER, &doc).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
