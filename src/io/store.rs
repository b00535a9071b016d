//! Persistence of the IPAM state and peer name in one JSON file, `<dir>/weft.json`.
//!
//! Saves are atomic (temp file in the same directory, fsync, rename, fsync the directory),
//! so a crash leaves either the old or the new file. A file that cannot be parsed is moved
//! aside, never overwritten or silently replaced by an empty state: losing the ring or the
//! allocations could hand out addresses that are still in use.

use crate::core::mesh::secure::{hex, unhex, StaticKey};
use crate::core::persist::{self, DecodeError, PersistedState};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Default `--db-dir`.
pub const DEFAULT_DIR: &str = "/var/lib/weft";
/// Name of the state file inside the directory.
pub const FILE_NAME: &str = "weft.json";

const TMP_PREFIX: &str = ".weft.json.tmp-";
/// The node's static private key (hex), readable by root only.
pub const KEY_FILE: &str = "weft.key";
const KEY_TMP_PREFIX: &str = ".weft.key.tmp-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state file {path} is corrupt ({reason}); moved it to {aside}. Inspect it, or start \
         without it knowing that addresses in use may be handed out again"
    )]
    Corrupt {
        path: PathBuf,
        aside: PathBuf,
        reason: String,
    },
    #[error(
        "state file {path} has format version {found}; this weft understands up to {supported}"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "key file {path} is unreadable ({reason}); the node's identity is in it. Restore it, or          delete it and run `weft rmpeer <this node>` on a member so that the new key is accepted"
    )]
    BadKey { path: PathBuf, reason: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

/// Distinguishes temp files of concurrent saves within one process.
static SAVE_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the state directory and removes temp files left by a
    /// save that crashed before its rename.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("creating directory", &dir))?;
        let entries = fs::read_dir(&dir).map_err(io_err("reading directory", &dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) || name.starts_with(KEY_TMP_PREFIX) {
                let p = entry.path();
                fs::remove_file(&p).map_err(io_err("removing stale temp file", &p))?;
            }
        }
        Ok(Store { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The saved state, or None if nothing was ever saved. A corrupt file is moved aside and
    /// reported as `StoreError::Corrupt`; the caller decides whether to start afresh.
    pub fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let reason = match persist::decode(&bytes) {
            Ok(state) => return Ok(Some(state)),
            Err(DecodeError::NewerVersion { found }) => {
                return Err(StoreError::UnsupportedVersion {
                    path,
                    found,
                    supported: persist::FORMAT_VERSION,
                })
            }
            Err(DecodeError::Corrupt(reason)) => reason,
        };
        let aside = self.move_aside(&path)?;
        Err(StoreError::Corrupt {
            path,
            aside,
            reason,
        })
    }

    /// Moves `path` to the first free `weft.json.corrupt-<n>`, never replacing an earlier
    /// copy: `hard_link` fails if the target exists, unlike `rename`.
    fn move_aside(&self, path: &Path) -> Result<PathBuf, StoreError> {
        for n in 1u32.. {
            let aside = self.dir.join(format!("{FILE_NAME}.corrupt-{n}"));
            match fs::hard_link(path, &aside) {
                Ok(()) => {
                    fs::remove_file(path).map_err(io_err("removing", path))?;
                    sync_dir(&self.dir)?;
                    return Ok(aside);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("moving aside", path)(e)),
            }
        }
        Err(io_err("moving aside", path)(std::io::Error::other(
            "no free corrupt-<n> name",
        )))
    }

    /// The node's static key: read from `weft.key`, or made and saved (0600, atomically)
    /// on first start. Never replaced silently: peers bind this node's name to it.
    pub fn load_or_create_key(&self) -> Result<StaticKey, StoreError> {
        let path = self.dir.join(KEY_FILE);
        let bad = |reason: String| StoreError::BadKey {
            path: path.clone(),
            reason,
        };
        match fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = unhex(&text).ok_or_else(|| bad("not hex".into()))?;
                return StaticKey::from_private(&bytes).map_err(|e| bad(e.to_string()));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("reading", &path)(e)),
        }
        let key = StaticKey::generate().map_err(|e| bad(e.to_string()))?;
        let tmp = self
            .dir
            .join(format!("{KEY_TMP_PREFIX}{}", std::process::id()));
        let mut text = hex(key.private());
        text.push('\n');
        let result = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("creating", &tmp))?;
            f.write_all(text.as_bytes())
                .map_err(io_err("writing", &tmp))?;
            f.sync_all().map_err(io_err("syncing", &tmp))?;
            // hard_link, not rename: two routers starting on one directory must not both
            // believe that their key is the node's.
            fs::hard_link(&tmp, &path).map_err(io_err("linking into place", &path))?;
            sync_dir(&self.dir)
        })();
        let _ = fs::remove_file(&tmp);
        result?;
        Ok(key)
    }

    /// Atomically replaces the state file with `state`.
    pub fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        let bytes = persist::encode(state);
        let seq = SAVE_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{}-{seq}", std::process::id()));
        let result = write_synced(&tmp, &bytes).and_then(|()| {
            let path = self.path();
            fs::rename(&tmp, &path).map_err(io_err("renaming into place", &path))?;
            sync_dir(&self.dir)
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.write_all(bytes).map_err(io_err("writing", path))?;
    f.sync_all().map_err(io_err("syncing", path))
}

/// Makes a rename or unlink in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ipam::Ipam;
    use crate::core::mesh::PeerName;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "weft-store-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample() -> PersistedState {
        let me = PeerName::parse("02:77:76:00:00:01").unwrap();
        let other = PeerName::parse("02:77:76:00:00:02").unwrap();
        let mut ipam = Ipam::new(me.clone(), "192.168.0.0/16".parse().unwrap());
        ipam.seed(&[me.clone(), other]).unwrap();
        ipam.allocate("weave:expose").unwrap();
        ipam.allocate("abc123").unwrap();
        PersistedState::new(Some(me), ipam.state(), Default::default())
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_key_is_made_once_kept_private_and_never_replaced_silently() {
        use std::os::unix::fs::PermissionsExt;
        let t = TempDir::new("key");
        let s = Store::open(&t.0).unwrap();
        let k1 = s.load_or_create_key().unwrap();
        let mode = fs::metadata(t.0.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = Store::open(&t.0).unwrap().load_or_create_key().unwrap();
        assert_eq!(
            k1.public(),
            k2.public(),
            "the same identity after a restart"
        );
        fs::write(t.0.join(KEY_FILE), "not a key").unwrap();
        let e = s.load_or_create_key().unwrap_err();
        assert!(matches!(e, StoreError::BadKey { .. }), "{e}");
        assert_eq!(fs::read_to_string(t.0.join(KEY_FILE)).unwrap(), "not a key");
        assert_eq!(
            names_in(&t.0),
            vec![KEY_FILE.to_string()],
            "no temp files left"
        );
    }

    #[test]
    fn missing_file_loads_as_none_and_dir_is_created() {
        let t = TempDir::new("none");
        let s = Store::open(t.0.join("a/b")).unwrap();
        assert!(s.dir().is_dir());
        assert!(s.load().unwrap().is_none());
    }

    #[test]
    fn save_then_load_roundtrips() {
        let t = TempDir::new("rt");
        let s = Store::open(&t.0).unwrap();
        let st = sample();
        s.save(&st).unwrap();
        assert_eq!(s.load().unwrap(), Some(st.clone()));
        let mut st2 = st.clone();
        st2.ipam.allocations.clear();
        s.save(&st2).unwrap();
        assert_eq!(s.load().unwrap(), Some(st2));
        assert_eq!(
            names_in(&t.0),
            vec![FILE_NAME.to_string()],
            "no temp files left"
        );
        // The state restores into a working allocator.
        let loaded = Store::open(&t.0).unwrap().load().unwrap().unwrap();
        let me = loaded.peer_name.clone().unwrap();
        Ipam::restore(me, "192.168.0.0/16".parse().unwrap(), loaded.ipam_state()).unwrap();
    }

    #[test]
    fn open_removes_stale_temp_files() {
        let t = TempDir::new("tmp");
        fs::create_dir_all(&t.0).unwrap();
        fs::write(t.0.join(format!("{TMP_PREFIX}1-0")), b"half").unwrap();
        fs::write(t.0.join("unrelated"), b"x").unwrap();
        Store::open(&t.0).unwrap();
        assert_eq!(names_in(&t.0), vec!["unrelated".to_string()]);
    }

    #[test]
    fn corrupt_file_is_moved_aside_never_overwriting() {
        let t = TempDir::new("corrupt");
        let s = Store::open(&t.0).unwrap();
        for (n, junk) in [&b"{ not json"[..], b"", b"{\"version\":1}"]
            .iter()
            .enumerate()
        {
            fs::write(s.path(), junk).unwrap();
            match s.load() {
                Err(StoreError::Corrupt {
                    path,
                    aside,
                    reason,
                }) => {
                    assert_eq!(path, s.path());
                    assert_eq!(aside, t.0.join(format!("weft.json.corrupt-{}", n + 1)));
                    assert_eq!(fs::read(&aside).unwrap(), *junk);
                    assert!(!reason.is_empty());
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
            assert!(!s.path().exists());
        }
        assert!(
            s.load().unwrap().is_none(),
            "after moving aside nothing is loaded"
        );
        let err = {
            fs::write(s.path(), b"[1,2").unwrap();
            s.load().unwrap_err()
        };
        assert!(err.to_string().contains("corrupt-4"), "{err}");
    }

    #[test]
    fn newer_format_is_not_treated_as_corrupt() {
        let t = TempDir::new("newer");
        let s = Store::open(&t.0).unwrap();
        fs::write(s.path(), br#"{"version": 7, "whatever": true}"#).unwrap();
        assert!(matches!(
            s.load(),
            Err(StoreError::UnsupportedVersion { found: 7, .. })
        ));
        assert!(s.path().exists(), "left in place");
    }

    #[test]
    fn invalid_peer_name_is_corrupt() {
        let t = TempDir::new("badname");
        let s = Store::open(&t.0).unwrap();
        let mut v = serde_json::to_value(sample()).unwrap();
        v["peer_name"] = serde_json::json!("not-a-mac");
        fs::write(s.path(), serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(matches!(s.load(), Err(StoreError::Corrupt { .. })));
    }
}
