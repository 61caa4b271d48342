//! The data directory: private to the daemon's user (the directory and every directory under
//! it 0700, every file 0600, whatever the umask), used by one daemon at a time (an advisory
//! lock on `daemon.lock`), and home of the admin token (`admin.token`, generated on first start).
//!
//! Files under it hold message payloads (in-flight publications, Trace output and payload
//! previews in the activity log) and the admin token, so nobody else on the machine may read
//! them; and two daemons writing one set of in-flight logs would corrupt them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file's name.
pub const LOCK_FILE: &str = "daemon.lock";
/// The admin token's file name.
pub const TOKEN_FILE: &str = "admin.token";

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory (or a file in it) cannot be created, opened or written.
    #[error("data directory {dir}: {what}: {message}")]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// What was being done.
        what: String,
        /// The OS error.
        message: String,
    },
    /// Another daemon holds the lock.
    #[error("another flowbus daemon (pid {pid}) is using the data directory {dir}; stop it, or give this daemon a data directory of its own (data_dir in flowbus.toml, or --data-dir)")]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// The other daemon's pid, as it wrote it (`unknown` when unreadable).
        pid: String,
    },
}

/// An open, locked, private data directory. The lock is held until this is dropped (or the
/// process ends, however it ends).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
    tightened: Vec<(PathBuf, u32)>,
}

impl DataDir {
    /// Creates the directory (0700) when missing, takes the lock (failing at once when
    /// another daemon holds it), and tightens the modes of what is already there.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        let io = |what: &str, e: std::io::Error| DataDirError::Io {
            dir: path.to_path_buf(),
            what: what.to_string(),
            message: e.to_string(),
        };
        create_private_dir_all(path).map_err(|e| io("cannot create it", e))?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| io(&format!("cannot open {}", lock_path.display()), e))?;
        // SAFETY: flock on a descriptor this function owns; it reads or writes no memory.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(DataDirError::Locked {
                    dir: path.to_path_buf(),
                    pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
                });
            }
            return Err(io(&format!("cannot lock {}", lock_path.display()), e));
        }
        lock.set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| writeln!(lock, "{}", std::process::id()))
            .map_err(|e| io(&format!("cannot write {}", lock_path.display()), e))?;
        let tightened = tighten(path);
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: lock,
            tightened,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What [`open`](Self::open) found readable or writable by others, with its old mode,
    /// and made private.
    pub fn tightened(&self) -> &[(PathBuf, u32)] {
        &self.tightened
    }

    /// The admin token: the one in `admin.token`, or a new random one (256 bits, hex)
    /// written there (0600) when the file is missing or empty. Returns it and whether it
    /// was generated now.
    pub fn admin_token(&self) -> Result<(String, bool), DataDirError> {
        let file = self.path.join(TOKEN_FILE);
        let io = |what: &str, e: std::io::Error| DataDirError::Io {
            dir: self.path.clone(),
            what: format!("{what} {}", file.display()),
            message: e.to_string(),
        };
        match std::fs::read_to_string(&file) {
            Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), false)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot read", e)),
        }
        let token = random_token().map_err(|e| io("cannot make a random token for", e))?;
        let tmp = self
            .path
            .join(format!("{TOKEN_FILE}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        private_options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| {
                writeln!(f, "{token}")?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &file))
            .map_err(|e| io("cannot write", e))?;
        Ok((token, true))
    }
}

/// Open options that create files 0600 (whatever the umask adds, it can only take away).
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Creates a directory and its missing parents, each new one 0700.
pub fn create_private_dir_all(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Everything under `dir` (and `dir` itself) that others may read, write or enter, with
/// its mode. Symbolic links are not followed.
pub fn loose_modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    with_mode_bits(dir, 0o077)
}

/// Every directory and file at or under `path` whose mode has one of `bits`, with its mode,
/// sorted. Symbolic links are not followed.
pub fn with_mode_bits(path: &Path, bits: u32) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else if !meta.is_file() {
            continue;
        }
        if mode & bits != 0 {
            out.push((p, mode));
        }
    }
    out.sort();
    out
}

/// Takes the group's and others' permissions away from everything [`loose_modes`] finds;
/// returns what it changed, with the old modes.
fn tighten(dir: &Path) -> Vec<(PathBuf, u32)> {
    let loose = loose_modes(dir);
    loose
        .into_iter()
        .filter(|(p, mode)| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o700)).is_ok()
        })
        .collect()
}

/// 256 random bits from the kernel, as 64 hex digits.
fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The admin token of the daemon using `data_dir`, as the command line reads it.
pub fn read_token(data_dir: &Path) -> std::io::Result<String> {
    let t = std::fs::read_to_string(data_dir.join(TOKEN_FILE))?;
    let t = t.trim();
    if t.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    Ok(t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowbus-datadir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_directory_is_private_and_its_token_is_random_private_and_kept() {
        let d = scratch("new");
        let dir = DataDir::open(&d.join("a/b")).unwrap();
        assert_eq!(mode(&d.join("a/b")), 0o700);
        assert_eq!(mode(&d.join("a")), 0o700, "missing parents are private too");
        let (t, generated) = dir.admin_token().unwrap();
        assert!(generated);
        assert_eq!(t.len(), 64);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(mode(&d.join("a/b").join(TOKEN_FILE)), 0o600);
        assert_eq!(mode(&d.join("a/b").join(LOCK_FILE)), 0o600);
        let (again, generated) = dir.admin_token().unwrap();
        assert_eq!((again.as_str(), generated), (t.as_str(), false));
        assert_eq!(read_token(&d.join("a/b")).unwrap(), t);
        drop(dir);
        let other = scratch("new2");
        let t2 = DataDir::open(&other).unwrap().admin_token().unwrap().0;
        assert_ne!(t, t2, "each directory gets a token of its own");
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&other);
    }

    #[test]
    fn loose_modes_are_tightened_at_open_and_reported() {
        let d = scratch("loose");
        std::fs::create_dir_all(d.join("activity-log")).unwrap();
        std::fs::write(d.join("activity-log/activity.log"), "x").unwrap();
        std::fs::write(d.join(TOKEN_FILE), "t0k3n-from-before\n").unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            d.join("activity-log/activity.log"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::set_permissions(d.join(TOKEN_FILE), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        assert_eq!(loose_modes(&d).len(), 4);
        let dir = DataDir::open(&d).unwrap();
        let changed: Vec<_> = dir
            .tightened()
            .iter()
            .map(|(p, m)| (p.clone(), *m))
            .collect();
        assert!(changed.contains(&(d.clone(), 0o755)), "{changed:?}");
        assert!(
            changed.contains(&(d.join(TOKEN_FILE), 0o666)),
            "{changed:?}"
        );
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join("activity-log")), 0o700);
        assert_eq!(mode(&d.join("activity-log/activity.log")), 0o600);
        assert_eq!(mode(&d.join(TOKEN_FILE)), 0o600);
        assert!(loose_modes(&d).is_empty());
        // An existing token is kept.
        assert_eq!(
            dir.admin_token().unwrap(),
            ("t0k3n-from-before".into(), false)
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_second_open_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let d = scratch("lock");
        let first = DataDir::open(&d).unwrap();
        let e = DataDir::open(&d).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id()))
                && text.contains(&d.display().to_string()),
            "{text}"
        );
        assert!(matches!(e, DataDirError::Locked { .. }));
        drop(first);
        DataDir::open(&d).expect("free again once the first is gone");
        let _ = std::fs::remove_dir_all(&d);
    }
}
