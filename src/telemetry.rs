//! Logging: one `tracing` subscriber, text or JSON, filtered by `RUST_LOG` or the config.
//! The access log has its own writer (`access_log`), but the same filter turns it off.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The target whose filter turns the access log off (`RUST_LOG=info,access=off`).
pub const ACCESS_TARGET: &str = "access";

/// Installs the global subscriber. `RUST_LOG` wins over `level`. Calling it twice is harmless.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
