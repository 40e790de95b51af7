//! `keepwarm new`: a plugin project in Rust, JavaScript or Python that builds and passes its own
//! sample test out of the box.
//!
//! Every project has `manifest.toml`, `build.sh` (writes `build/<name>.wasm`), `test.sh` (builds,
//! then runs `keepwarm test` over `fixtures/sample.jsonl` and compares the answer with
//! `fixtures/expected.jsonl`), a README and a `.gitignore`, plus its language's sources. The
//! sample plugin caches each row's JSON under `<name>:{table}:{pks}`.
//!
//! The templates live in `guest-sdk/templates/` and are compiled into the binary. A project
//! builds against the keepwarm source tree it names (`--sdk`, by default the tree this binary
//! was built from), written into it as an absolute path: the Rust SDK as a path dependency, the
//! JavaScript and Python builds through that tree's build scripts and pinned toolchains. So it
//! builds offline on any machine that has the tree.

use anyhow::{Context as _, bail, ensure};
use std::path::{Path, PathBuf};

/// The language of a new plugin project.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with the `keepwarm-guest` crate; built with cargo for wasm32-wasip2.
    Rust,
    /// JavaScript, with the `keepwarm-guest` module; built with jco (QuickJS backend).
    Js,
    /// Python, with the `keepwarm_guest` module; built with componentize-py.
    Python,
}

/// What to create.
#[derive(Clone, Debug)]
pub struct NewPlugin {
    /// The language.
    pub lang: Lang,
    /// The plugin's name: lowercase ASCII letters, digits and single `-` between them.
    pub name: String,
    /// The project directory; it must not exist or be empty.
    pub dir: PathBuf,
    /// The keepwarm source tree whose SDKs, build scripts and toolchains the project uses.
    pub sdk: PathBuf,
    /// The keepwarm binary `test.sh` runs by default.
    pub keepwarm: PathBuf,
}

/// One template file: its path in the project (with placeholders) and its text.
struct Template {
    path: &'static str,
    text: &'static str,
    executable: bool,
}

macro_rules! template {
    ($path:literal, $file:literal) => {
        template!($path, $file, false)
    };
    ($path:literal, $file:literal, $executable:expr) => {
        Template {
            path: $path,
            text: include_str!(concat!("../../guest-sdk/templates/", $file)),
            executable: $executable,
        }
    };
}

const COMMON: &[Template] = &[
    template!("manifest.toml", "common/manifest.toml.tmpl"),
    template!("test.sh", "common/test.sh.tmpl", true),
    template!(".gitignore", "common/gitignore.tmpl"),
    template!("fixtures/sample.jsonl", "common/fixtures/sample.jsonl.tmpl"),
    template!(
        "fixtures/expected.jsonl",
        "common/fixtures/expected.jsonl.tmpl"
    ),
];

const RUST: &[Template] = &[
    template!("Cargo.toml", "rust/Cargo.toml.tmpl"),
    template!(".cargo/config.toml", "rust/cargo-config.toml.tmpl"),
    template!("src/lib.rs", "rust/src/lib.rs.tmpl"),
    template!("build.sh", "rust/build.sh.tmpl", true),
    template!("README.md", "rust/README.md.tmpl"),
];

const JS: &[Template] = &[
    template!("package.json", "js/package.json.tmpl"),
    template!("src/index.js", "js/src/index.js.tmpl"),
    template!("build.sh", "js/build.sh.tmpl", true),
    template!("README.md", "js/README.md.tmpl"),
];

const PYTHON: &[Template] = &[
    template!("pyproject.toml", "python/pyproject.toml.tmpl"),
    template!("{{snake}}.py", "python/module.py.tmpl"),
    template!("build.sh", "python/build.sh.tmpl", true),
    template!("README.md", "python/README.md.tmpl"),
];

/// Names a Python plugin's module cannot take: they would shadow the bindings, the helper, the
/// world, or a standard module the helper imports.
const PYTHON_RESERVED: &[&str] = &[
    "plugin",
    "keepwarm_guest",
    "wit_world",
    "componentize_py_types",
    "componentize_py_runtime",
    "componentize_py_async_support",
    "poll_loop",
    "json",
    "math",
    "decimal",
    "typing",
    "types",
];

/// The keepwarm source tree this binary was built from, when it is still there.
pub fn default_sdk() -> Option<PathBuf> {
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    is_sdk(&tree).then(|| tree.canonicalize().unwrap_or(tree))
}

fn is_sdk(tree: &Path) -> bool {
    tree.join("wit/keepwarm.wit").is_file() && tree.join("guest-sdk/Cargo.toml").is_file()
}

/// Checks a plugin name: lowercase ASCII letters and digits, words joined by single `-`,
/// starting with a letter.
///
/// # Errors
///
/// When the name does not have that form.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let well_formed = name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && !name.contains("--")
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ensure!(
        well_formed && name.len() <= 64,
        "plugin name {name:?}: use lowercase letters, digits and single '-' between words, \
         starting with a letter (at most 64 characters)"
    );
    Ok(())
}

/// Creates the project and returns the files written, relative to its directory.
///
/// # Errors
///
/// A bad name, a directory that exists and is not empty, an `--sdk` that is not a keepwarm tree
/// (or whose path cannot be written into the project's files), or a failed write.
pub fn create(new: &NewPlugin) -> anyhow::Result<Vec<PathBuf>> {
    check_name(&new.name)?;
    let snake = new.name.replace('-', "_");
    if new.lang == Lang::Python && PYTHON_RESERVED.contains(&snake.as_str()) {
        bail!(
            "plugin name {:?}: its Python module {snake} would shadow a module the plugin needs",
            new.name
        );
    }
    ensure!(
        is_sdk(&new.sdk),
        "{} is not a keepwarm source tree (no wit/keepwarm.wit and guest-sdk); pass --sdk",
        new.sdk.display()
    );
    let sdk = std::path::absolute(&new.sdk)?;
    let keepwarm = std::path::absolute(&new.keepwarm)?;
    for path in [&sdk, &keepwarm] {
        let text = path.to_str().context("paths must be UTF-8")?;
        ensure!(
            !text.contains(['"', '\\', '\'', '$', '`', '{', '}', '\n']),
            "{text:?}: the path is written into shell scripts and TOML and cannot hold quotes, \
             backslashes, '$', backquotes or braces"
        );
    }
    if new.dir.exists() {
        let mut entries = std::fs::read_dir(&new.dir)
            .with_context(|| format!("cannot read {}", new.dir.display()))?;
        ensure!(
            entries.next().is_none(),
            "{} exists and is not empty",
            new.dir.display()
        );
    }
    let values = [
        ("{{name}}", new.name.clone()),
        ("{{snake}}", snake.clone()),
        ("{{type}}", camel_case(&new.name)),
        ("{{sdk}}", sdk.display().to_string()),
        ("{{keepwarm}}", keepwarm.display().to_string()),
    ];
    let fill = |text: &str| {
        values.iter().fold(text.to_owned(), |text, (key, value)| {
            text.replace(key, value)
        })
    };
    let language = match new.lang {
        Lang::Rust => RUST,
        Lang::Js => JS,
        Lang::Python => PYTHON,
    };
    let mut written = Vec::new();
    for template in COMMON.iter().chain(language) {
        let relative = PathBuf::from(fill(template.path));
        write_file(
            &new.dir.join(&relative),
            &fill(template.text),
            template.executable,
        )?;
        written.push(relative);
    }
    // The tree's lock file pins the Rust dependencies to the versions it builds with (already in
    // the local cargo cache); cargo drops the entries the plugin does not use.
    let lock = sdk.join("Cargo.lock");
    if new.lang == Lang::Rust && lock.is_file() {
        std::fs::copy(&lock, new.dir.join("Cargo.lock"))
            .with_context(|| format!("cannot copy {}", lock.display()))?;
        written.push(PathBuf::from("Cargo.lock"));
    }
    Ok(written)
}

fn write_file(path: &Path, text: &str, executable: bool) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    if executable {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {} executable", path.display()))?;
    }
    Ok(())
}

/// `orders-index` becomes `OrdersIndex`.
fn camel_case(name: &str) -> String {
    name.split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "orders-index", "cache2", "a-1-b"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", "Orders", "1cache", "-a", "a-", "a--b", "a_b", "a b", "é",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_become_type_names() {
        assert_eq!(camel_case("orders-index"), "OrdersIndex");
        assert_eq!(camel_case("cache2"), "Cache2");
        assert_eq!(camel_case("a-1-b"), "A1B");
    }

    #[test]
    fn every_placeholder_is_known() {
        let known = [
            "{{name}}",
            "{{snake}}",
            "{{type}}",
            "{{sdk}}",
            "{{keepwarm}}",
        ];
        for template in COMMON.iter().chain(RUST).chain(JS).chain(PYTHON) {
            for text in [template.path, template.text] {
                let mut rest = text;
                while let Some(start) = rest.find("{{") {
                    let end = rest[start..]
                        .find("}}")
                        .map_or(rest.len(), |e| start + e + 2);
                    let placeholder = &rest[start..end];
                    assert!(
                        known.contains(&placeholder),
                        "{}: {placeholder}",
                        template.path
                    );
                    rest = &rest[end..];
                }
            }
        }
    }

    /// A project named `name` in `lang`, to be written to an empty directory of its own.
    fn new_plugin(lang: Lang, name: &str) -> NewPlugin {
        let dir = std::env::temp_dir().join(format!("kw-scaffold-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        NewPlugin {
            lang,
            name: name.to_owned(),
            dir,
            sdk: default_sdk().expect("built from a keepwarm tree"),
            keepwarm: PathBuf::from("/usr/local/bin/keepwarm"),
        }
    }

    #[test]
    fn a_project_is_written_with_its_values() {
        let new = new_plugin(Lang::Python, "price-watch");
        let (dir, sdk) = (&new.dir, &new.sdk);
        let written = create(&new).unwrap();
        assert!(written.contains(&PathBuf::from("price_watch.py")));
        let build = std::fs::read_to_string(dir.join("build.sh")).unwrap();
        assert!(build.contains(&format!(
            "\"{}/scripts/build-python-plugin.sh\" . build/price-watch.wasm",
            sdk.display()
        )));
        let test = std::fs::read_to_string(dir.join("test.sh")).unwrap();
        assert!(test.contains("${KEEPWARM:-/usr/local/bin/keepwarm}"));
        let error = create(&new).unwrap_err().to_string();
        assert!(error.ends_with("exists and is not empty"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_rust_project_is_set_up_for_a_fast_component() {
        let new = new_plugin(Lang::Rust, "row-keeper");
        let dir = &new.dir;
        create(&new).unwrap();
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(cargo.contains("opt-level = 3"), "{cargo}");
        let config = std::fs::read_to_string(dir.join(".cargo/config.toml")).unwrap();
        assert!(
            config.contains("[target.wasm32-wasip2]") && config.contains("+simd128"),
            "{config}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
