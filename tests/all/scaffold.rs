//! `keepwarm new`: a project in each language builds and passes its own sample test out of the
//! box, with the toolchains `scripts/setup.sh` installed.

use crate::util::*;
use std::process::Command;

/// Creates a project with `keepwarm new`, checks that it wrote `files` (beside the manifest and
/// `test.sh`), and runs its `test.sh` (build, then `keepwarm test` over the sample fixtures
/// against the expected answer).
fn new_project_passes_its_sample_test(lang: &str, files: &[&str]) {
    let _heavy = heavy_test();
    let dir = TempDir::new("kw-new");
    let project = dir.path().join("sample-cache");
    let (ok, out, err) = keepwarm_cli(
        &[
            "new",
            "--lang",
            lang,
            "sample-cache",
            project.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("manifest.toml") && out.contains("test.sh"),
        "{out}"
    );
    for file in files {
        assert!(out.contains(file), "{file} not written: {out}");
    }
    let output = Command::new(project.join("test.sh"))
        // A Rust project compiles its dependencies for wasm32 once; later runs reuse them.
        .env("CARGO_TARGET_DIR", target_dir().join("scaffold-rust"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "test.sh failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("sample-cache: sample test passed (5 changes)"),
        "{stdout}"
    );
}

#[test]
fn a_new_rust_plugin_builds_and_passes_its_sample_test() {
    // The build settings that make a fast component: opt-level 3 and WebAssembly SIMD.
    new_project_passes_its_sample_test("rust", &["Cargo.toml", ".cargo/config.toml"]);
}

#[test]
fn a_new_javascript_plugin_builds_and_passes_its_sample_test() {
    new_project_passes_its_sample_test("js", &["package.json"]);
}

#[test]
fn a_new_python_plugin_builds_and_passes_its_sample_test() {
    new_project_passes_its_sample_test("python", &["pyproject.toml"]);
}

#[test]
fn keepwarm_new_refuses_bad_names_and_non_empty_directories() {
    let dir = TempDir::new("kw-new");
    let (ok, _, err) = keepwarm_cli(&["new", "--lang", "js", "Bad_Name"], "");
    assert!(!ok && err.contains("use lowercase letters"), "{err}");
    std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
    let (ok, _, err) = keepwarm_cli(
        &[
            "new",
            "--lang",
            "rust",
            "fine",
            dir.path().to_str().unwrap(),
        ],
        "",
    );
    assert!(!ok && err.contains("exists and is not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("keep.txt")).unwrap(),
        "mine"
    );
    let (ok, _, err) = keepwarm_cli(&["new", "--lang", "python", "json"], "");
    assert!(!ok && err.contains("would shadow"), "{err}");
}
