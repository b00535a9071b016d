//! `weft install-cni`: what the DaemonSet's init container runs on every node. Puts the
//! plugin where the runtime looks (`/opt/cni/bin`) under both names a conflist may use,
//! and a conflist in `/etc/cni/net.d` unless one for weft or Weave is already there.
//!
//! Every file appears whole or not at all (temporary file in the same directory, fsync,
//! rename): a runtime executing the plugin, or reading the directory, while a node is being
//! upgraded never sees half a binary or half a conflist. Running it again changes nothing
//! but the plugin binaries, which it replaces with the image's (an upgrade).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The names the plugin is installed under: weft's own, and Weave's, so that a node's
/// existing `10-weave.conflist` (`"type": "weave-net"`) runs weft from now on.
pub const PLUGIN_NAMES: [&str; 2] = ["weft", "weave-net"];
/// The conflist weft writes when the node has none for weft or Weave.
pub const CONFLIST_NAME: &str = "10-weft.conflist";
/// Weave's conflist, with portmap chained, the plugin type `weft` and CNI 1.0.0 (the
/// newest version the reference portmap plugin speaks). The network keeps Weave's name,
/// so whatever keys on it (runtimes' result caches, monitoring) sees no change.
pub const CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "weave",
  "plugins": [
    {
      "name": "weave",
      "type": "weft",
      "hairpinMode": true
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      },
      "snat": true
    }
  ]
}
"#;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read the plugin {path}: {source}")]
    ReadPlugin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct InstallOptions {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// The `weft-cni` binary to install.
    pub plugin: PathBuf,
}

/// What the node's conf dir holds for weft after the install.
#[derive(Debug, PartialEq, Eq)]
pub enum Conflist {
    /// None was there: weft's was written.
    Written(PathBuf),
    /// One that runs weft or Weave's plugin was there and is kept as it is.
    Kept(PathBuf),
}

#[derive(Debug)]
pub struct Installed {
    pub plugins: Vec<PathBuf>,
    pub conflist: Conflist,
    /// Conflists of other networks that sort before weft's: the runtime uses the first one
    /// in lexical order, so while these are there pods are not attached by weft.
    pub shadowing: Vec<PathBuf>,
}

/// Installs the plugin and, if needed, the conflist.
pub fn install(opts: &InstallOptions) -> Result<Installed, InstallError> {
    let plugin = fs::read(&opts.plugin).map_err(|source| InstallError::ReadPlugin {
        path: opts.plugin.clone(),
        source,
    })?;
    let mut plugins = Vec::new();
    for name in PLUGIN_NAMES {
        let path = opts.bin_dir.join(name);
        write_atomically(&path, &plugin, 0o755)?;
        plugins.push(path);
    }

    let existing = conf_files(&opts.conf_dir)?;
    let ours = existing.iter().find(|(_, runs_weft)| *runs_weft);
    let conflist = match ours {
        Some((path, _)) => Conflist::Kept(path.clone()),
        None => {
            let path = opts.conf_dir.join(CONFLIST_NAME);
            write_atomically(&path, CONFLIST.as_bytes(), 0o644)?;
            Conflist::Written(path)
        }
    };
    let used = match &conflist {
        Conflist::Written(p) | Conflist::Kept(p) => p.clone(),
    };
    let shadowing = existing
        .into_iter()
        .filter(|(path, runs_weft)| !runs_weft && file_name(path) < file_name(&used))
        .map(|(path, _)| path)
        .collect();
    Ok(Installed {
        plugins,
        conflist,
        shadowing,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The network configurations in `dir` (what libcni loads: `.conf`, `.conflist`, `.json`),
/// in lexical order, each with whether it runs weft (a plugin of type `weft` or
/// `weave-net`). A file that does not parse counts as another network's.
fn conf_files(dir: &Path) -> Result<Vec<(PathBuf, bool)>, InstallError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|source| InstallError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
            return Ok(Vec::new());
        }
        Err(source) => {
            return Err(InstallError::ReadDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let is_conf = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("conf" | "conflist" | "json")
        );
        if !is_conf || !path.is_file() {
            continue;
        }
        let runs_weft = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| runs_weft(&v));
        out.push((path, runs_weft));
    }
    out.sort_by_key(|(p, _)| file_name(p));
    Ok(out)
}

/// Whether a network configuration (single plugin or list) has weft's plugin in it.
fn runs_weft(conf: &serde_json::Value) -> bool {
    let is_weft = |p: &serde_json::Value| {
        p["type"]
            .as_str()
            .is_some_and(|t| PLUGIN_NAMES.contains(&t))
    };
    match conf["plugins"].as_array() {
        Some(plugins) => plugins.iter().any(is_weft),
        None => is_weft(conf),
    }
}

fn write_atomically(path: &Path, content: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    // A dot name the runtime ignores (not .conf/.conflist/.json, not a plugin type).
    let tmp = dir.join(format!(
        ".{}.weft-tmp-{}",
        file_name(path),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        // The mode given to open is masked by the umask; the plugin must be executable.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Dirs {
        _root: tempfile::TempDir,
        opts: InstallOptions,
    }

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let plugin = root.path().join("weft-cni");
        fs::write(&plugin, b"\x7fELF plugin v1").unwrap();
        let opts = InstallOptions {
            bin_dir: root.path().join("opt/cni/bin"),
            conf_dir: root.path().join("etc/cni/net.d"),
            plugin,
        };
        Dirs { _root: root, opts }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_bare_node_gets_the_plugin_under_both_names_and_weft_s_conflist() {
        let d = dirs();
        let got = install(&d.opts).unwrap();
        assert_eq!(listing(&d.opts.bin_dir), ["weave-net", "weft"]);
        for p in &got.plugins {
            assert_eq!(fs::read(p).unwrap(), b"\x7fELF plugin v1");
            let mode = fs::metadata(p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755, "{p:?}");
        }
        let conf = d.opts.conf_dir.join(CONFLIST_NAME);
        assert_eq!(got.conflist, Conflist::Written(conf.clone()));
        assert_eq!(listing(&d.opts.conf_dir), [CONFLIST_NAME]);
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&conf).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["type"], "weft");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        assert!(got.shadowing.is_empty());
    }

    #[test]
    fn running_again_changes_nothing_but_upgrades_the_plugin() {
        let d = dirs();
        install(&d.opts).unwrap();
        let conf = d.opts.conf_dir.join(CONFLIST_NAME);
        // An operator's edit of the conflist survives a restart of the DaemonSet.
        let edited = CONFLIST.replace("\"hairpinMode\": true", "\"hairpinMode\": false");
        fs::write(&conf, &edited).unwrap();
        fs::write(&d.opts.plugin, b"\x7fELF plugin v2").unwrap();
        let got = install(&d.opts).unwrap();
        assert_eq!(got.conflist, Conflist::Kept(conf.clone()));
        assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
        assert_eq!(listing(&d.opts.bin_dir), ["weave-net", "weft"]);
        assert_eq!(listing(&d.opts.conf_dir), [CONFLIST_NAME]);
        for p in &got.plugins {
            assert_eq!(fs::read(p).unwrap(), b"\x7fELF plugin v2");
        }
    }

    #[test]
    fn weave_s_conflist_is_kept_and_runs_weft_through_weave_net() {
        let d = dirs();
        fs::create_dir_all(&d.opts.conf_dir).unwrap();
        let weave = r#"{"cniVersion":"0.3.0","name":"weave","plugins":[{"name":"weave","type":"weave-net","hairpinMode":true},{"type":"portmap","capabilities":{"portMappings":true},"snat":true}]}"#;
        let weave_conf = d.opts.conf_dir.join("10-weave.conflist");
        fs::write(&weave_conf, weave).unwrap();
        // Weave installed its plugin as a symlink; the rename replaces the link itself.
        fs::create_dir_all(&d.opts.bin_dir).unwrap();
        fs::write(d.opts.bin_dir.join("weave-plugin-2.8.1"), b"weave").unwrap();
        std::os::unix::fs::symlink("weave-plugin-2.8.1", d.opts.bin_dir.join("weave-net")).unwrap();
        let got = install(&d.opts).unwrap();
        assert_eq!(got.conflist, Conflist::Kept(weave_conf.clone()));
        assert_eq!(listing(&d.opts.conf_dir), ["10-weave.conflist"]);
        assert_eq!(fs::read_to_string(&weave_conf).unwrap(), weave);
        let net = d.opts.bin_dir.join("weave-net");
        assert!(!fs::symlink_metadata(&net).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&net).unwrap(), b"\x7fELF plugin v1");
        assert_eq!(
            fs::read(d.opts.bin_dir.join("weave-plugin-2.8.1")).unwrap(),
            b"weave"
        );
    }

    #[test]
    fn other_networks_that_the_runtime_would_pick_first_are_reported() {
        let d = dirs();
        fs::create_dir_all(&d.opts.conf_dir).unwrap();
        let aws = d.opts.conf_dir.join("10-aws.conflist");
        fs::write(
            &aws,
            r#"{"cniVersion":"0.4.0","name":"aws-cni","plugins":[{"type":"aws-cni"}]}"#,
        )
        .unwrap();
        fs::write(
            d.opts.conf_dir.join("99-loopback.conf"),
            r#"{"type":"loopback"}"#,
        )
        .unwrap();
        fs::write(d.opts.conf_dir.join("README"), "not a network").unwrap();
        let got = install(&d.opts).unwrap();
        assert_eq!(
            got.conflist,
            Conflist::Written(d.opts.conf_dir.join(CONFLIST_NAME))
        );
        assert_eq!(got.shadowing, vec![aws]);
    }

    #[test]
    fn a_missing_plugin_is_an_error_and_writes_nothing() {
        let d = dirs();
        fs::remove_file(&d.opts.plugin).unwrap();
        let e = install(&d.opts).unwrap_err();
        assert!(matches!(e, InstallError::ReadPlugin { .. }), "{e}");
        assert!(!d.opts.bin_dir.exists());
        assert!(!d.opts.conf_dir.exists());
    }

    #[test]
    fn single_plugin_confs_count_too() {
        assert!(runs_weft(&serde_json::json!({"type": "weave-net"})));
        assert!(runs_weft(
            &serde_json::json!({"plugins": [{"type": "bandwidth"}, {"type": "weft"}]})
        ));
        assert!(!runs_weft(
            &serde_json::json!({"plugins": [{"type": "bridge"}]})
        ));
        assert!(!runs_weft(&serde_json::json!("garbage")));
    }
}
