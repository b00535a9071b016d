//! The CNI plugin's input: its stdin (the network configuration) and the CNI_* variables,
//! parsed by the plugin's own modules (included by path: the plugin is a binary crate).
#![no_main]
#![allow(dead_code)]

#[path = "../../cni-plugin/src/spec.rs"]
mod spec;
#[path = "../../cni-plugin/src/config.rs"]
mod config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The first line holds CNI_* variables (KEY=VALUE, tab-separated); the rest is stdin.
    let (env, stdin) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let env = String::from_utf8_lossy(env).into_owned();
    let lookup = |k: &str| {
        env.split('\t')
            .filter_map(|kv| kv.split_once('='))
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
    };
    let _ = config::declared_version(stdin);
    if let Ok(conf) = config::NetConf::parse(stdin) {
        let _ = format!("{conf:?}");
    }
    let _ = config::Command::from_env(&lookup);
    let _ = config::Env::for_add(&lookup);
    let _ = config::Env::for_del(&lookup);
});
