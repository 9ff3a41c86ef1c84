//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) through the fuzz targets'
//! entry points on stable Rust, so every input the fuzzers kept still passes in CI. The
//! fuzzing itself needs nightly and cargo-fuzz: see docs/fuzzing.md.

use std::path::Path;
use std::time::Instant;

use switchyard::fuzzing;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus folder fuzz/corpus/{target}: {e}"));
    let mut files: Vec<_> = entries
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus folder fuzz/corpus/{target} is empty"
    );
    let start = Instant::now();
    for path in &files {
        let bytes = std::fs::read(path).expect("corpus file");
        // A panic names the input that caused it.
        let result = std::panic::catch_unwind(|| run(&bytes));
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("{target}: {} panicked: {message}", path.display());
        }
    }
    eprintln!(
        "{target}: {} inputs replayed in {:?}",
        files.len(),
        start.elapsed()
    );
}

#[test]
fn route_document() {
    replay("route_document", fuzzing::route_document);
}

#[test]
fn jwt_provider_document() {
    replay("jwt_provider_document", fuzzing::jwt_provider_document);
}

#[test]
fn api_key_document() {
    replay("api_key_document", fuzzing::api_key_document);
}

#[test]
fn jwt_token() {
    replay("jwt_token", fuzzing::jwt_token);
}

#[test]
fn config_toml() {
    replay("config_toml", fuzzing::config_toml);
}

#[test]
fn consul_bodies() {
    replay("consul_bodies", fuzzing::consul_bodies);
}

#[test]
fn path_routing() {
    replay("path_routing", fuzzing::path_routing);
}

#[test]
fn request_head() {
    replay("request_head", fuzzing::request_head);
}

#[test]
fn response_head() {
    replay("response_head", fuzzing::response_head);
}

#[test]
fn chunked_body() {
    replay("chunked_body", fuzzing::chunked_body);
}

#[test]
fn grpc_fields() {
    replay("grpc_fields", fuzzing::grpc_fields);
}

#[test]
fn registry_wan_flag() {
    replay("registry_wan_flag", fuzzing::registry_wan_flag);
}

#[test]
fn trace_context() {
    replay("trace_context", fuzzing::trace_context);
}
