//! weft-cni: the CNI plugin of the weft overlay network.
//!
//! Also installed as `weave-net` (Weave's conflist type); nothing here depends on the
//! name it was run under.

mod client;
mod cmd;
mod config;
mod link;
mod netns;
mod spec;

use std::io::{Read, Write};
use std::time::Instant;

use config::{Command, Env, NetConf};
use spec::{CniError, ErrorCode, Version};

fn lookup(key: &str) -> Option<String> {
    std::env::var_os(key).map(|v| v.to_string_lossy().into_owned())
}

/// What a successful command prints (DEL, CHECK, GC and STATUS print nothing).
fn run(command: Command, stdin: &[u8]) -> Result<Option<serde_json::Value>, CniError> {
    match command {
        Command::Version => Ok(Some(spec::version_reply())),
        Command::Add => {
            let conf = NetConf::parse(stdin)?;
            let env = Env::for_add(&lookup)?;
            cmd::add(&conf, &env).map(Some)
        }
        Command::Del => {
            let conf = NetConf::parse(stdin)?;
            let env = Env::for_del(&lookup)?;
            cmd::del(&conf, &env).map(|()| None)
        }
        Command::Check => {
            let conf = NetConf::parse(stdin)?;
            let env = Env::for_add(&lookup)?;
            cmd::check(&conf, &env).map(|()| None)
        }
        // Neither concerns one container: only CNI_COMMAND (and CNI_PATH) are given.
        Command::Gc => cmd::gc(&NetConf::parse(stdin)?).map(|()| None),
        Command::Status => cmd::status(&NetConf::parse(stdin)?).map(|()| None),
    }
}

/// A network configuration is a few KiB, even with a prevResult; far more is not one.
const MAX_STDIN: u64 = 1024 * 1024;

fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            CniError::new(
                ErrorCode::Io,
                "cannot read the network configuration from stdin",
                e.to_string(),
            )
        })?;
    if buf.len() as u64 > MAX_STDIN {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "network configuration too large",
            format!("stdin holds more than {MAX_STDIN} bytes; a CNI configuration is a few KiB"),
        ));
    }
    Ok(buf)
}

fn main() {
    let started = Instant::now();
    let command = Command::from_env(&lookup);
    // VERSION may be run by hand with a terminal on stdin: do not wait for input.
    // Everything else reads it, also to answer errors in the declared version.
    let stdin = match command {
        Ok(Command::Version) => Ok(Vec::new()),
        _ => read_stdin(),
    };
    let outcome = match (&command, &stdin) {
        (Err(e), _) | (Ok(_), Err(e)) => Err(e.clone()),
        (Ok(command), Ok(input)) => run(*command, input),
    };
    let stdin = stdin.unwrap_or_default();
    let answered = outcome.as_ref().err().map(|e| e.code.code());
    let mut out = std::io::stdout().lock();
    let code = match outcome {
        Ok(Some(value)) => {
            let _ = writeln!(out, "{value}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let version = config::declared_version(&stdin).unwrap_or(Version::NEWEST);
            eprintln!(
                "weft-cni: {} {}: {e}",
                lookup("CNI_COMMAND").unwrap_or_default(),
                lookup("CNI_CONTAINERID").unwrap_or_default()
            );
            let _ = writeln!(out, "{}", e.to_json(version));
            1
        }
    };
    let _ = out.flush();
    drop(out);
    // After the answer is out, so a slow or absent daemon changes neither output nor
    // exit status; VERSION is no command on a network.
    match command {
        Ok(Command::Version) | Err(_) => {}
        Ok(command) => {
            let observation = client::Observation {
                command: command.as_str(),
                code: answered,
                seconds: started.elapsed().as_secs_f64(),
            };
            client::observe(config::daemon_address_of(&stdin), &observation);
        }
    }
    std::process::exit(code);
}
