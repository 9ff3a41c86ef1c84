//! Edge authentication: identities, per-route requirements and their errors.
