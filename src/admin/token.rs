//! The admin listener's bearer token: `admin.token`, or `admin.token_file` read at start
//! and again whenever the file's modification time or size changes (checked on each
//! request that needs it: a `stat`, no timer), so a rotated token takes effect without a
//! restart. A file that cannot be read or holds nothing keeps the last good token (the
//! listener never falls open). Compared in constant time.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use subtle::ConstantTimeEq;

/// Where the admin token comes from, and its current value.
#[derive(Debug)]
pub struct AdminToken {
    source: Source,
}

#[derive(Debug)]
enum Source {
    Fixed(String),
    File {
        path: PathBuf,
        current: Mutex<FileToken>,
    },
}

#[derive(Debug)]
struct FileToken {
    token: String,
    /// Modification time and length of the file as last read.
    stamp: Option<(SystemTime, u64)>,
    /// The last re-read failed with this (logged once per distinct error).
    error: Option<String>,
}

/// Why a token file cannot give a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: the file holds no token")]
    Empty(String),
}

impl AdminToken {
    pub fn fixed(token: &str) -> AdminToken {
        AdminToken {
            source: Source::Fixed(token.to_string()),
        }
    }

    /// Reads the file now: a token file that cannot be read at start is an error.
    pub fn from_file(path: &Path) -> Result<AdminToken, TokenFileError> {
        let (token, stamp) = read(path)?;
        Ok(AdminToken {
            source: Source::File {
                path: path.to_path_buf(),
                current: Mutex::new(FileToken {
                    token,
                    stamp,
                    error: None,
                }),
            },
        })
    }

    /// Whether `given` (the text after `Bearer `) is the current token.
    pub fn matches(&self, given: &str) -> bool {
        let given = given.trim().as_bytes();
        match &self.source {
            Source::Fixed(t) => bool::from(given.ct_eq(t.as_bytes())),
            Source::File { path, current } => {
                let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
                refresh(path, &mut current);
                bool::from(given.ct_eq(current.token.as_bytes()))
            }
        }
    }
}

fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read(path: &Path) -> Result<(String, Option<(SystemTime, u64)>), TokenFileError> {
    let stamp = stamp_of(path);
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty(path.display().to_string()));
    }
    Ok((token.to_string(), stamp))
}

/// Reads the file again when its stamp changed; keeps the last token when that fails.
fn refresh(path: &Path, current: &mut FileToken) {
    let stamp = stamp_of(path);
    if stamp.is_some() && stamp == current.stamp {
        return;
    }
    match read(path) {
        Ok((token, stamp)) => {
            if token != current.token {
                tracing::info!(path = %path.display(), "admin token file read again: new token in use");
            }
            current.token = token;
            current.stamp = stamp;
            current.error = None;
        }
        Err(e) => {
            let message = e.to_string();
            if current.error.as_deref() != Some(message.as_str()) {
                tracing::warn!(error = %message, "admin token file cannot be read again; the last token stays in use");
                current.error = Some(message);
            }
            // Not read: try again on the next request, whatever the stamp says.
            current.stamp = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_token_matches_only_itself() {
        let t = AdminToken::fixed("s3cret");
        assert!(t.matches("s3cret"));
        assert!(t.matches(" s3cret "));
        assert!(!t.matches("s3cre"));
        assert!(!t.matches("s3cret2"));
        assert!(!t.matches(""));
    }

    #[test]
    fn a_token_file_is_read_again_when_it_changes_and_kept_when_it_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        std::fs::write(&path, "first\n").unwrap();
        let t = AdminToken::from_file(&path).unwrap();
        assert!(t.matches("first"));
        // A longer token: the size changes even where the clock is coarse.
        std::fs::write(&path, "second-token\n").unwrap();
        assert!(t.matches("second-token"));
        assert!(!t.matches("first"), "the old token is gone");
        std::fs::write(&path, "  \n").unwrap();
        assert!(
            t.matches("second-token"),
            "an empty file keeps the last token"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(
            t.matches("second-token"),
            "a missing file keeps the last token"
        );
        assert!(!t.matches(""));

        assert!(matches!(
            AdminToken::from_file(&dir.path().join("nope")),
            Err(TokenFileError::Read { .. })
        ));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            AdminToken::from_file(&path),
            Err(TokenFileError::Empty(_))
        ));
    }
}
