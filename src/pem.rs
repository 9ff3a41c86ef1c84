//! Certificates and private keys read from PEM files, for TLS on both sides of the gateway
//! (termination in `tls`, the client certificate towards upstreams in `upstream_tls`).
//! Every error names the file it is about.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

impl PemError {
    /// What is wrong with the content of `path`.
    pub fn file(path: &Path, message: impl Into<String>) -> PemError {
        PemError::File {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Every `CERTIFICATE` block of the file, in order; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::file(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(PemError::file(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The first private key of the file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|e| PemError::file(path, format!("bad PEM: {e}")))?
        .ok_or_else(|| PemError::file(path, "no PRIVATE KEY block"))
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>, PemError> {
    let file = std::fs::File::open(path).map_err(|source| PemError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(BufReader::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn certificates_and_keys_are_read_in_order() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let chain = write(&dir, "chain.pem", &format!("{}{}", cert.pem(), cert.pem()));
        let key_path = write(&dir, "key.pem", &key.serialize_pem());
        let certs = read_certs(&chain).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].as_ref(), cert.der().as_ref());
        let read = read_key(&key_path).unwrap();
        assert_eq!(read.secret_der(), key.serialize_der().as_slice());
    }

    #[test]
    fn each_problem_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = write(&dir, "empty.pem", "no pem here\n");
        let broken = write(
            &dir,
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let cases = [
            (read_certs(&missing).unwrap_err(), "cannot read"),
            (read_certs(&empty).unwrap_err(), "no CERTIFICATE block"),
            (read_key(&empty).unwrap_err(), "no PRIVATE KEY block"),
            (read_certs(&broken).unwrap_err(), "bad PEM"),
        ];
        for (error, says) in cases {
            let text = error.to_string();
            assert!(text.contains(says), "{text}");
            assert!(text.contains(dir.path().to_str().unwrap()), "{text}");
        }
    }
}
