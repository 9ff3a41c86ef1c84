//! An embedded Consul-compatible registry for tests, the quick start and fault injection.

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("not built yet")]
    NotBuilt,
}

pub async fn serve_until_signal(
    _addr: std::net::SocketAddr,
    _token: Option<String>,
) -> Result<(), RegistryError> {
    Err(RegistryError::NotBuilt)
}
