//! Wiring: starts watches and listeners, publishes snapshots (the single writer), shuts down in order.

use std::net::SocketAddr;

use crate::config::{Config, FileConfig};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0} is not wired yet")]
    NotWired(&'static str),
}

pub async fn run_until_signal(_cfg: Config) -> Result<(), AppError> {
    Err(AppError::NotWired("run"))
}

pub async fn dev(_file: FileConfig, _registry: SocketAddr) -> Result<(), AppError> {
    Err(AppError::NotWired("dev"))
}
