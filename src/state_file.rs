//! The warm-start file (`consul.state_file`, `--state-file`): the last route documents and
//! instances Consul confirmed, written atomically (temporary file, fsync, rename) after each
//! change and read at boot when Consul cannot be reached, so a restart during a Consul
//! outage still serves.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::discovery::Instance;

/// Bumped when the shape changes incompatibly; other versions are ignored at boot.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not a Switchyard state file: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What the gateway last knew.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedState {
    pub format: u32,
    /// When this data was last confirmed by Consul (Unix ms).
    pub written_at_unix_ms: u64,
    /// Route documents as stored in KV, by route name.
    pub routes: BTreeMap<String, String>,
    /// Instances of each routed service (shared with the writer: no copy per change).
    #[serde(serialize_with = "ser_services", deserialize_with = "de_services")]
    pub services: BTreeMap<String, Arc<Vec<Instance>>>,
    /// Tags of the services that carry fabio `urlprefix-` tags (`[fabio] enabled`), so tag
    /// routes warm-start too. Absent in files written without fabio routing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fabio_tags: BTreeMap<String, Vec<String>>,
}

type Services = BTreeMap<String, Arc<Vec<Instance>>>;

fn ser_services<S: Serializer>(services: &Services, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(services.iter().map(|(k, v)| (k, v.as_slice())))
}

fn de_services<'de, D: Deserializer<'de>>(d: D) -> Result<Services, D::Error> {
    let plain = BTreeMap::<String, Vec<Instance>>::deserialize(d)?;
    Ok(plain.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
}

impl PersistedState {
    pub fn new(routes: BTreeMap<String, String>, services: Services) -> PersistedState {
        PersistedState {
            format: FORMAT,
            written_at_unix_ms: unix_ms(),
            routes,
            services,
            fabio_tags: BTreeMap::new(),
        }
    }

    /// The same state with the tags fabio routes are made from.
    pub fn with_fabio_tags(mut self, tags: BTreeMap<String, Vec<String>>) -> PersistedState {
        self.fabio_tags = tags;
        self
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads the file; `Ok(None)` when it does not exist.
pub fn load(path: &Path) -> Result<Option<PersistedState>, StateFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateFileError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let state: PersistedState =
        serde_json::from_slice(&bytes).map_err(|e| StateFileError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if state.format != FORMAT {
        return Err(StateFileError::Invalid {
            path: path.to_path_buf(),
            message: format!("format {} (this build reads {FORMAT})", state.format),
        });
    }
    Ok(Some(state))
}

/// Writes the file so that a reader sees the old or the new content, never a mix.
pub fn write_atomic(path: &Path, state: &PersistedState) -> Result<(), StateFileError> {
    let io = |source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.as_deref().unwrap_or("state"),
        std::process::id()
    ));
    let bytes = serde_json::to_vec(state).map_err(|e| StateFileError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::InstanceHealth;

    fn sample() -> PersistedState {
        let mut routes = BTreeMap::new();
        routes.insert(
            "users".into(),
            r#"{"service":"users","path_prefix":"/users"}"#.into(),
        );
        let mut services = BTreeMap::new();
        services.insert(
            "users".into(),
            Arc::new(vec![Instance {
                id: "n1/users-1".into(),
                node: "n1".into(),
                service_id: "users-1".into(),
                address: "127.0.0.1".into(),
                port: 9000,
                tags: vec!["v2".into()],
                meta: Default::default(),
                health: InstanceHealth::Warning,
                weight: 3,
            }]),
        );
        PersistedState::new(routes, services)
    }

    #[test]
    fn a_written_state_reads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(load(&path).unwrap().is_none());
        let s = sample();
        write_atomic(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap().unwrap(), s);
        // Overwriting leaves no temporary file behind.
        write_atomic(&path, &s).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn fabio_tags_round_trip_and_files_without_them_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let plain = sample();
        write_atomic(&path, &plain).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("fabio_tags"), "{text}");
        assert_eq!(load(&path).unwrap().unwrap().fabio_tags, BTreeMap::new());

        let mut tags = BTreeMap::new();
        tags.insert(
            "users".to_string(),
            vec!["urlprefix-/u strip=/u".to_string()],
        );
        let tagged = sample().with_fabio_tags(tags.clone());
        write_atomic(&path, &tagged).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().fabio_tags, tags);
    }

    #[test]
    fn a_foreign_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "hello").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("state.json"), "{err}");
        let mut s = sample();
        s.format = 99;
        std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("format 99"));
    }
}
