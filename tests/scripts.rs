//! The scripts in `scripts/` (benchmarks, the chaos and soak runs, helpers) stay out of CI
//! because they take minutes and measure time; this checks at least that each one still
//! parses, so an edit cannot leave one broken until its next run.

use std::path::{Path, PathBuf};
use std::process::Command;

fn scripts(ext: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    found.sort();
    found
}

#[test]
fn every_shell_script_parses() {
    let found = scripts("sh");
    assert!(found.len() >= 10, "scripts found: {found:?}");
    for script in found {
        let out = Command::new("bash")
            .arg("-n")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_python_script_compiles() {
    let found = scripts("py");
    assert!(!found.is_empty());
    for script in found {
        // Compiled from stdin: `py_compile` would leave a `__pycache__` in `scripts/`.
        let source = std::fs::read_to_string(&script).unwrap();
        let out = Command::new("python3")
            .args([
                "-c",
                "import sys; compile(sys.stdin.read(), sys.argv[1], 'exec')",
            ])
            .arg(&script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin is piped")
                    .write_all(source.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
