//! The registry's error answer: a status and a plain-text body, as Consul's errors are
//! (never JSON), plus `Allow` for a 405. Agent and store errors map to Consul's statuses here.

use http::StatusCode;

use super::agent::AgentError;
use super::store::StoreError;

/// Consul's text for writes and default/consistent reads without a leader.
pub const NO_LEADER: &str = "rpc error making call: No cluster leader";

/// An error answer: status and plain-text body (plus `Allow` for 405).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: String,
    pub allow: Option<&'static str>,
    /// Ask the client to close the connection (`Connection: close`): the request was not
    /// read to its end.
    pub close: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, body: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: body.into(),
            allow: None,
            close: false,
        }
    }

    pub fn bad_request(body: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, body)
    }

    pub fn internal(body: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, body)
    }

    pub fn no_leader() -> ApiError {
        ApiError::internal(NO_LEADER)
    }

    /// 413 for a body over `max` bytes, in Consul's words; `drained` says whether the
    /// body was read to its end, else the connection closes after the answer.
    pub fn too_large(size: u64, max: u64, drained: bool) -> ApiError {
        ApiError {
            close: !drained,
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body({size} bytes) too large, max size: {max} bytes."),
            )
        }
    }

    /// 405 naming the methods the endpoint takes.
    pub fn method_not_allowed(method: &http::Method, allow: &'static str) -> ApiError {
        ApiError {
            allow: Some(allow),
            ..ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed"),
            )
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        let status = match &e {
            AgentError::MissingServiceName
            | AgentError::InvalidCheck(_)
            | AgentError::UnknownService(_)
            | AgentError::Store(_) => StatusCode::BAD_REQUEST,
            AgentError::NoSuchService(_) | AgentError::UnknownCheck(_) => StatusCode::NOT_FOUND,
            AgentError::NotTtl(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}
