//! Client ids: stable per installation, flow and node, so a restarted daemon resumes its
//! persistent sessions.

use std::fmt::Write as _;

use flowbus_runtime::datadir::{create_private_dir_all, private_options};

/// A stable client id for a node: `fb-<instance>-<flow>-<node>`, so a restarted daemon
/// resumes its persistent sessions and two daemons (different data directories) never clash.
pub fn client_id(instance: &str, flow: &str, node: &str, suffix: Option<usize>) -> String {
    let mut id = format!("fb-{instance}-{flow}-{node}");
    if let Some(n) = suffix {
        let _ = write!(id, "-{n}");
    }
    id.retain(|c| !matches!(c, '+' | '#' | '/'));
    id
}

/// This installation's id (per data directory), created on first use.
pub fn instance_id(data_dir: &std::path::Path) -> String {
    let path = data_dir.join("instance-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return s;
        }
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        ^ (u128::from(std::process::id()) << 64);
    let id = format!("{:08x}", (seed ^ (seed >> 37) ^ (seed >> 71)) as u32);
    let _ = create_private_dir_all(data_dir);
    let _ = private_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, id.as_bytes()));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_stable_and_clean() {
        assert_eq!(client_id("ab12", "f", "n", None), "fb-ab12-f-n");
        assert_eq!(client_id("ab12", "f", "n", Some(2)), "fb-ab12-f-n-2");
    }
}
