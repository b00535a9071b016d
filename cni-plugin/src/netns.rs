//! Running code inside a container's network namespace.
//!
//! setns(2) changes the namespace of the calling thread only, and async runtimes move
//! work between threads, so namespace work runs on a dedicated std thread that enters
//! the namespace first and never leaves it (the thread ends with the work). The main
//! thread stays in the node namespace throughout.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path} (is it a network namespace?): {source}")]
    Enter { path: String, source: nix::Error },
    #[error("cannot start a thread for network namespace {path}: {source}")]
    Spawn {
        path: String,
        source: std::io::Error,
    },
    #[error("the thread working in network namespace {path} panicked")]
    Panicked { path: String },
}

/// An open handle on a network namespace; keeps it alive while held.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: String,
}

impl Netns {
    pub fn open(path: &str) -> Result<Netns, NetnsError> {
        let file = File::open(Path::new(path)).map_err(|source| NetnsError::Open {
            path: path.to_string(),
            source,
        })?;
        Ok(Netns {
            file,
            path: path.to_string(),
        })
    }

    /// Whether this is the calling process's own network namespace (the node's): a pod
    /// must never be plumbed there.
    pub fn is_current(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ours = match std::fs::metadata("/proc/self/ns/net") {
            Ok(m) => m,
            Err(_) => return false,
        };
        self.file
            .metadata()
            .is_ok_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino())
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `work` on a fresh thread inside this namespace and returns its result.
    pub fn run<T, F>(&self, work: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let fd = self.file.try_clone().map_err(|source| NetnsError::Open {
            path: self.path.clone(),
            source,
        })?;
        let path = self.path.clone();
        let handle = std::thread::Builder::new()
            .name("weft-cni-netns".into())
            .spawn(move || -> Result<T, NetnsError> {
                setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Enter { path, source })?;
                Ok(work())
            })
            .map_err(|source| NetnsError::Spawn {
                path: self.path.clone(),
                source,
            })?;
        handle.join().map_err(|_| NetnsError::Panicked {
            path: self.path.clone(),
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_missing_path_fails() {
        let err = Netns::open("/nonexistent/weft-netns").unwrap_err();
        assert!(matches!(err, NetnsError::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/weft-netns"));
    }

    #[test]
    fn entering_a_non_namespace_fails() {
        // A regular file is not a namespace: setns must refuse it, without root too.
        let ns = Netns::open("/proc/self/status").unwrap();
        let err = ns.run(|| ()).unwrap_err();
        assert!(matches!(err, NetnsError::Enter { .. }), "{err}");
    }
}
