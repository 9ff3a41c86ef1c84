//! The scripts in `scripts/` (benchmarks, the chaos and soak runs, helpers) stay out of CI
//! because they take minutes and measure time; this checks at least that each one still
//! parses, so an edit cannot leave one broken until its next run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

fn assert_clean(script: &Path, out: &Output) {
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
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
        assert_clean(&script, &out);
    }
}

#[test]
fn every_python_script_compiles() {
    let found = scripts("py");
    assert!(!found.is_empty());
    for script in found {
        // Compiled in memory: `py_compile` would leave a `__pycache__` in `scripts/`.
        let check = "import sys; compile(open(sys.argv[1]).read(), sys.argv[1], 'exec')";
        let out = Command::new("python3")
            .args(["-c", check])
            .arg(&script)
            .output()
            .unwrap();
        assert_clean(&script, &out);
    }
}
