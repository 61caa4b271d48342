//! Where a flow may read and write: every path a flow names (a Compute or Filter `script`, a
//! Trace `file`) must resolve, after following symbolic links, inside the flow's directory or
//! one of the directories the operator lists in `[daemon] allowed_paths`.
//!
//! [`confine`] decides in two steps. The first is lexical and does no I/O: a path that names a
//! place outside (an absolute path elsewhere, `..` past the directory) is refused before the
//! file system is asked anything about it, so a flow cannot use the daemon to learn whether
//! `/etc/shadow` exists. The second resolves symbolic links and checks the real place. A
//! refusal states the rule only: it never says whether the target exists or where a link
//! points.

use std::path::{Component, Path, PathBuf};

/// Why a path a flow names is refused. The text is the rule the path breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The path is empty.
    #[error("must name a file")]
    Empty,
    /// The path holds a NUL character, which no file name can.
    #[error("must not contain a NUL character")]
    Nul,
    /// The path ends in `.` or `..` (or is a directory by its spelling).
    #[error("must end in a file name, not '.' or '..'")]
    NotAFileName,
    /// The path is (or, through symbolic links, leads) outside the flow's directory and the
    /// allowed paths.
    #[error("must be inside the flow directory (after following symbolic links); to use a file elsewhere, list its directory in [daemon] allowed_paths")]
    Outside,
}

/// Resolves `written` (as a flow names it: relative to the flow's directory, or absolute) and
/// returns the real path of the file, with symbolic links resolved, when it lies inside
/// `flow_dir` or one of the `allowed` directories. The file itself need not exist (a trace
/// file is created on first use); missing directories on the way are taken as they are
/// written.
pub fn confine(flow_dir: &Path, allowed: &[PathBuf], written: &str) -> Result<PathBuf, Refusal> {
    let joined = lexical(flow_dir, allowed, written)?;
    let real = resolve(&joined).ok_or(Refusal::Outside)?;
    let inside = std::iter::once(flow_dir)
        .chain(allowed.iter().map(PathBuf::as_path))
        .filter_map(|dir| resolve(&absolute(dir)?))
        .any(|dir| real.starts_with(&dir));
    if inside {
        Ok(real)
    } else {
        Err(Refusal::Outside)
    }
}

/// The first, pure step of [`confine`]: `flow_dir` joined with `written`, when the spelling
/// alone keeps it inside `flow_dir` or an allowed directory. Touches nothing on disk (the
/// current directory is asked for when `flow_dir` is relative). Returns the joined path as
/// written (not normalised), so that resolving it follows the links the way the kernel would.
pub fn lexical(flow_dir: &Path, allowed: &[PathBuf], written: &str) -> Result<PathBuf, Refusal> {
    if written.is_empty() {
        return Err(Refusal::Empty);
    }
    if written.contains('\0') {
        return Err(Refusal::Nul);
    }
    // By the spelling, not by `components()`, which drops a trailing `.` and `/`.
    if matches!(written.rsplit('/').next(), Some("" | "." | "..")) {
        return Err(Refusal::NotAFileName);
    }
    let path = Path::new(written);
    let base = absolute(flow_dir).ok_or(Refusal::Outside)?;
    let joined = base.join(path);
    let normal = normalise(&joined);
    let inside = std::iter::once(base)
        .chain(allowed.iter().filter_map(|a| absolute(a)))
        .any(|dir| normal.starts_with(normalise(&dir)));
    if inside {
        Ok(joined)
    } else {
        Err(Refusal::Outside)
    }
}

/// `path` made absolute against the current directory, without touching it.
fn absolute(path: &Path) -> Option<PathBuf> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    std::path::absolute(path).ok()
}

/// `.` and `..` taken out by spelling alone (`..` above the root stays at the root, as the
/// kernel does).
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The real path of an absolute `path`: symbolic links followed. When the path does not
/// exist, a dangling symbolic link is followed to where it points, and a missing name is
/// appended to the real path of its directory (a `..` after a missing directory cannot be
/// resolved and gives `None`).
fn resolve(path: &Path) -> Option<PathBuf> {
    resolve_within(path, 0)
}

/// Links followed by hand before giving up, as the kernel's limit (`ELOOP`).
const MAX_LINKS: u32 = 40;

fn resolve_within(path: &Path, links: u32) -> Option<PathBuf> {
    if let Ok(real) = std::fs::canonicalize(path) {
        return Some(real);
    }
    // A link whose target is missing: creating the file would follow it.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        if links >= MAX_LINKS {
            return None;
        }
        let target = std::fs::read_link(path).ok()?;
        return resolve_within(&path.parent()?.join(target), links + 1);
    }
    match path.components().next_back()? {
        Component::Normal(name) => Some(resolve_within(path.parent()?, links)?.join(name)),
        Component::CurDir => resolve_within(path.parent()?, links),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fresh directory with a flow directory `flows/` and a directory `outside/` beside it
    /// holding `secret.conf`.
    fn scene(name: &str) -> (PathBuf, PathBuf) {
        let root =
            std::env::temp_dir().join(format!("flowbus-paths-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("flows/lib")).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        std::fs::write(root.join("outside/secret.conf"), "password = x").unwrap();
        std::fs::write(root.join("flows/enrich.rhai"), "1").unwrap();
        (root.join("flows"), root)
    }

    fn real(p: &Path) -> PathBuf {
        std::fs::canonicalize(p).unwrap()
    }

    #[test]
    fn a_relative_path_inside_is_accepted_and_resolved() {
        let (flows, _) = scene("inside");
        assert_eq!(
            confine(&flows, &[], "enrich.rhai"),
            Ok(real(&flows.join("enrich.rhai")))
        );
        // `..` that stays inside is fine.
        assert_eq!(
            confine(&flows, &[], "lib/../enrich.rhai"),
            Ok(real(&flows.join("enrich.rhai")))
        );
    }

    #[test]
    fn a_file_that_does_not_exist_yet_inside_is_accepted() {
        let (flows, _) = scene("new");
        assert_eq!(
            confine(&flows, &[], "lib/trace.log"),
            Ok(real(&flows.join("lib")).join("trace.log"))
        );
        assert_eq!(
            confine(&flows, &[], "new/dir/x.rhai"),
            Ok(real(&flows).join("new/dir/x.rhai"))
        );
    }

    #[test]
    fn dot_dot_and_absolute_paths_outside_are_refused() {
        let (flows, root) = scene("outside");
        for written in [
            "../outside/secret.conf",
            "lib/../../outside/secret.conf",
            root.join("outside/secret.conf").to_str().unwrap(),
            "/etc/passwd",
        ] {
            assert_eq!(
                confine(&flows, &[], written),
                Err(Refusal::Outside),
                "{written}"
            );
        }
    }

    #[test]
    fn a_path_outside_is_refused_by_its_spelling_alone() {
        // The lexical step decides without the file system: the refusal is the same whether
        // the target exists or not, and the directory asked about need not exist at all.
        let (flows, root) = scene("lexical");
        let missing = Path::new("/nonexistent-flowbus-dir/flows");
        assert_eq!(lexical(missing, &[], "/etc/shadow"), Err(Refusal::Outside));
        assert_eq!(lexical(missing, &[], "../x.rhai"), Err(Refusal::Outside));
        assert_eq!(
            lexical(&flows, &[], "../outside/secret.conf"),
            lexical(&flows, &[], "../outside/no-such-file")
        );
        assert_eq!(
            confine(&flows, &[], root.join("outside/nope").to_str().unwrap()),
            Err(Refusal::Outside)
        );
    }

    #[test]
    fn a_symbolic_link_to_a_file_outside_is_refused() {
        let (flows, root) = scene("link");
        symlink(root.join("outside/secret.conf"), flows.join("db.rhai")).unwrap();
        // A dangling link says no more than a live one.
        symlink(root.join("outside/missing"), flows.join("gone.rhai")).unwrap();
        assert_eq!(confine(&flows, &[], "db.rhai"), Err(Refusal::Outside));
        assert_eq!(confine(&flows, &[], "gone.rhai"), Err(Refusal::Outside));
        // A link that stays inside is followed, dangling or not.
        symlink(flows.join("enrich.rhai"), flows.join("alias.rhai")).unwrap();
        assert_eq!(
            confine(&flows, &[], "alias.rhai"),
            Ok(real(&flows.join("enrich.rhai")))
        );
        symlink("lib/later.log", flows.join("later.log")).unwrap();
        assert_eq!(
            confine(&flows, &[], "later.log"),
            Ok(real(&flows.join("lib")).join("later.log"))
        );
        // A loop of links leads nowhere.
        symlink("loop-b.log", flows.join("loop-a.log")).unwrap();
        symlink("loop-a.log", flows.join("loop-b.log")).unwrap();
        assert_eq!(confine(&flows, &[], "loop-a.log"), Err(Refusal::Outside));
    }

    #[test]
    fn a_symbolically_linked_directory_leading_outside_is_refused() {
        let (flows, root) = scene("linkdir");
        symlink(root.join("outside"), flows.join("shared")).unwrap();
        assert_eq!(
            confine(&flows, &[], "shared/secret.conf"),
            Err(Refusal::Outside)
        );
        assert_eq!(
            confine(&flows, &[], "shared/new.log"),
            Err(Refusal::Outside)
        );
        assert_eq!(
            confine(&flows, &[], "shared/a/b.log"),
            Err(Refusal::Outside)
        );
    }

    #[test]
    fn an_allowed_directory_is_accepted_after_following_its_links() {
        let (flows, root) = scene("allowed");
        let allowed = [root.join("outside")];
        assert_eq!(
            confine(&flows, &allowed, "../outside/secret.conf"),
            Ok(real(&root.join("outside/secret.conf")))
        );
        symlink(root.join("outside"), flows.join("shared")).unwrap();
        assert_eq!(
            confine(&flows, &allowed, "shared/secret.conf"),
            Ok(real(&root.join("outside/secret.conf")))
        );
        // Only that directory: its parent stays out.
        assert_eq!(
            confine(&flows, &allowed, "../flows-other.rhai"),
            Err(Refusal::Outside)
        );
    }

    #[test]
    fn names_that_are_not_file_names_are_refused() {
        let (flows, _) = scene("names");
        assert_eq!(confine(&flows, &[], ""), Err(Refusal::Empty));
        assert_eq!(confine(&flows, &[], "a\0b.rhai"), Err(Refusal::Nul));
        for written in ["..", ".", "lib/..", "lib/.", "lib/"] {
            assert_eq!(
                confine(&flows, &[], written),
                Err(Refusal::NotAFileName),
                "{written}"
            );
        }
    }

    #[test]
    fn a_relative_flow_directory_is_taken_from_the_current_one() {
        // `flowbus validate flow.json` gives a flow directory of "".
        assert!(lexical(Path::new(""), &[], "x.rhai").is_ok());
        assert_eq!(
            lexical(Path::new(""), &[], "../x.rhai"),
            Err(Refusal::Outside)
        );
    }
}
