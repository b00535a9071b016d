//! A test harness for tests that need root (network namespaces, TUN devices), built on
//! libtest-mimic so that a test that cannot run is never reported as passed:
//! - as root it runs;
//! - without root it is reported as ignored (the harness's "skipped"), and if it is
//!   forced to run anyway (`--include-ignored`) it fails saying why;
//! - under CI (`CI` set to anything but `false`/`0`/empty) without root it fails: CI is
//!   root, so a missing privilege there is a broken setup, not a reason to skip.
//!
//! A test file using it sets `harness = false` for its `[[test]]` in Cargo.toml and calls
//! [`run`] from `main` with its tests listed by [`root`] and [`plain`].

use libtest_mimic::{Arguments, Failed, Trial};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Whether the process runs with root's effective uid.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether we run under CI (the `CI` variable, set by CI systems and by `.ci/run`).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Runs `f`, turning a panic (the way assertions fail) into a failure with its message.
fn guarded(f: fn()) -> Result<(), Failed> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "test panicked".to_string());
        Failed::from(msg)
    })
}

/// A test that needs root.
pub fn root(name: &str, f: fn()) -> Trial {
    if is_root() {
        return Trial::test(name, move || guarded(f));
    }
    if under_ci() {
        return Trial::test(name, || {
            Err("needs root, and CI is set: CI runs as root, so this setup is broken".into())
        });
    }
    Trial::test(name, || {
        Err("needs root (create network namespaces and TUN devices)".into())
    })
    .with_kind("needs root")
    .with_ignored_flag(true)
}

/// A test that needs root and these programs on PATH (packages `.ci/run` installs):
/// ignored when one is missing, except under CI, where it fails saying which.
pub fn root_with(name: &str, programs: &'static [&'static str], f: fn()) -> Trial {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !on_path(p)).collect();
    if missing.is_empty() || !is_root() {
        return root(name, f);
    }
    let why = format!(
        "needs {} (see .ci/run for the packages)",
        missing.join(", ")
    );
    if under_ci() {
        return Trial::test(name, move || Err(format!("{why}, and CI is set").into()));
    }
    Trial::test(name, move || Err(why.clone().into()))
        .with_kind("needs programs")
        .with_ignored_flag(true)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

/// A test that runs anywhere.
pub fn plain(name: &str, f: fn()) -> Trial {
    Trial::test(name, move || guarded(f))
}

/// As [`run`], for tests that share state built once (a cluster): they run one after
/// another in the order given, and `teardown` runs after the last, before the exit.
pub fn run_in_order(tests: Vec<Trial>, teardown: impl FnOnce()) -> ! {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    if !is_root() && !under_ci() && tests.iter().any(|t| t.has_ignored_flag()) {
        eprintln!("skipped: tests marked \"needs root\" (run as root to include them)");
    }
    let conclusion = libtest_mimic::run(&args, tests);
    teardown();
    conclusion.exit()
}

/// Parses the test binary's arguments (filters, `--test-threads`, ...) like the
/// built-in harness, runs `tests` and exits with the harness's status.
pub fn run(tests: Vec<Trial>) -> ! {
    let args = Arguments::from_args();
    if !is_root() && !under_ci() && tests.iter().any(|t| t.has_ignored_flag()) {
        eprintln!("skipped: tests marked \"needs root\" (run as root to include them)");
    }
    libtest_mimic::run(&args, tests).exit()
}
