use anyhow::Context;
use clap::{Parser, Subcommand};
use weft::config::RouterArgs;

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Overlay network for Kubernetes, compatible with Weave Net"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// The verdict on a new connection from SRC to DST, e.g. `x/b x/a 80/TCP`.
    Explain {
        src: String,
        dst: String,
        /// PORT/PROTO (`80/TCP`, `53/UDP`, `ICMP`); the protocol defaults to TCP.
        port: String,
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// The nftables table weft wrote on this node, in nft's syntax.
    Table {
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-node daemon.
    #[command(args_override_self = true)]
    Router(Box<RouterArgs>),
    /// Print the router's status (from its HTTP API).
    Status {
        /// peers | connections | ipam | targets | routes
        what: Option<String>,
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Print the router's full state as JSON, or through a Go template (`-f`).
    Report {
        /// A Go text/template over the report, as `weave report -f`, e.g.
        /// '{{.Router.Name}}' or '{{range .Router.Peers}}{{.NickName}} {{end}}'.
        #[arg(short = 'f', long = "format", value_name = "TEMPLATE")]
        format: Option<String>,
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// List the pods attached on this node: container id, node-side interface, the pod
    /// interface's MAC, address.
    Ps {
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Make the router dial these peers too (`host` or `host:port`).
    Connect {
        /// Drop the peers added with `connect` before and not listed here.
        #[arg(long)]
        replace: bool,
        #[arg(value_name = "PEER")]
        peers: Vec<String>,
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// NetworkPolicy on this node: `explain SRC DST PORT/PROTO` (pods as namespace/name
    /// or addresses) prints the policies that select each side and the verdict; `table`
    /// prints the nftables table weft wrote.
    Policy {
        #[command(subcommand)]
        what: PolicyCommand,
    },
    /// Make the router stop dialling these peers.
    Forget {
        #[arg(required = true, value_name = "PEER")]
        peers: Vec<String>,
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Print this node's own overlay address (the node is always exposed to the overlay).
    Expose {
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Print the versions of this program and of the running router.
    Version {
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Take over the address ranges of peers that are gone for good: each NAME is a peer
    /// name (02:..) or a nickname (the Kubernetes Node name).
    Rmpeer {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Forget the key each NAME (peer name or nickname) is bound to, so that a node that
    /// lost its --db-dir (and with it its key) can rejoin under its name, keeping its
    /// address ranges. Run it on every node; refused for a connected peer.
    ForgetKey {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Install the CNI plugin (as `weft` and `weave-net`) and, unless the node has one for
    /// weft or Weave already, the conflist: what the DaemonSet's init container runs.
    InstallCni {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: std::path::PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: std::path::PathBuf,
        /// The plugin binary to install [default: weft-cni beside this program]
        #[arg(long)]
        plugin: Option<std::path::PathBuf>,
    },
    /// Remove what the router leaves on the node after it stops: its nftables table (NAT
    /// rules). Pods' addresses and the state in --db-dir are kept.
    Reset,
    /// Build a local cluster in network namespaces, attach pods through weft-cni, send
    /// traffic between all of them and print the result (needs root).
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
    },
}

/// The command line, with Weave's `EXTRA_ARGS` (router flags in one variable, as Weave's
/// launch script took them) placed right after `router`: flags given on the command line
/// come later and so win.
fn args_with_extra(
    mut args: Vec<std::ffi::OsString>,
    extra: Option<String>,
) -> Vec<std::ffi::OsString> {
    if args.get(1).is_some_and(|a| a == "router") {
        if let Some(extra) = extra {
            let at = 2;
            for (k, a) in extra.split_whitespace().enumerate() {
                args.insert(at + k, a.into());
            }
        }
    }
    args
}

/// The variables the router's flags read. A manifest lists optional settings with empty
/// values (`WEAVE_MTU: ""`, as Weave's did): empty means unset, the default applies.
const ROUTER_ENV: [&str; 12] = [
    "IPALLOC_RANGE",
    "WEAVE_HTTP_ADDR",
    "WEAVE_METRICS_ADDR",
    "WEAVE_MTU",
    "IPALLOC_INIT",
    "CONN_LIMIT",
    "KUBE_PEERS",
    "KUBECONFIG",
    "POD_NAMESPACE",
    "EXTRA_ARGS",
    "NO_MASQ_LOCAL",
    "WEFT_DATAPATH",
];

/// Logs to stderr, filtered by `RUST_LOG` (default `info`, e.g. `weft=debug,info`), as
/// text or, with `WEFT_LOG_FORMAT=json`, one JSON object per line for log collectors.
fn init_logs() -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("WEFT_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().with_current_span(false).init(),
        Ok("text") | Ok("") | Err(_) => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        Ok(other) => anyhow::bail!("WEFT_LOG_FORMAT={other:?}: expected text or json"),
    }
    Ok(())
}

/// Reads each pod interface's MAC from the kernel (the far end of its node-side veth);
/// left as `-` where it cannot be read.
fn fill_macs(list: &mut [weft::cli::Attachment]) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let Ok(nl) = weft::io::netlink::Netlink::open() else {
            return;
        };
        for a in list.iter_mut() {
            if let Ok(Some(mac)) = nl.veth_peer_mac(&a.interface).await {
                a.mac = mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":");
            }
        }
    });
}

fn main() -> anyhow::Result<()> {
    for var in ROUTER_ENV {
        if std::env::var_os(var).is_some_and(|v| v.to_string_lossy().trim().is_empty()) {
            // Before any thread exists: nothing else reads the environment concurrently.
            std::env::remove_var(var);
        }
    }
    let args = args_with_extra(
        std::env::args_os().collect(),
        std::env::var("EXTRA_ARGS").ok(),
    );
    let cli = Cli::parse_from(args);
    match cli.command {
        Command::Router(args) => {
            init_logs()?;
            let hostname = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default();
            let cfg = (*args).validate(&hostname)?;
            weft::router::run(cfg).context("weft router failed")
        }
        Command::Status { what, http_addr } => {
            if what.as_deref() == Some("dns") {
                print!("{}", weft::cli::NO_DNS);
                return Ok(());
            }
            let text = weft::cli::status(&http_addr, what.as_deref())?;
            print!("{text}");
            Ok(())
        }
        Command::Report {
            format: Some(template),
            http_addr,
        } => {
            // Printed as rendered: a template decides its own newlines, as Weave's did.
            print!("{}", weft::cli::report_format(&http_addr, &template)?);
            Ok(())
        }
        Command::Report {
            format: None,
            http_addr,
        } => {
            let text = weft::cli::report(&http_addr)?;
            println!("{}", text.trim_end());
            Ok(())
        }
        Command::Ps { http_addr } => {
            let mut list = weft::cli::attachments(&http_addr)?;
            fill_macs(&mut list);
            print!("{}", weft::cli::render_ps(&list));
            Ok(())
        }
        Command::Connect {
            replace,
            peers,
            http_addr,
        } => {
            print!("{}", weft::cli::connect(&http_addr, &peers, replace)?);
            Ok(())
        }
        Command::Policy { what } => {
            match what {
                PolicyCommand::Explain {
                    src,
                    dst,
                    port,
                    http_addr,
                } => print!(
                    "{}",
                    weft::cli::policy_explain(&http_addr, &src, &dst, &port)?
                ),
                PolicyCommand::Table { http_addr } => {
                    print!("{}", weft::cli::policy_table(&http_addr)?)
                }
            }
            Ok(())
        }
        Command::Forget { peers, http_addr } => {
            print!("{}", weft::cli::forget(&http_addr, &peers)?);
            Ok(())
        }
        Command::Expose { http_addr } => {
            println!("{}", weft::cli::expose(&http_addr)?.trim_end());
            Ok(())
        }
        Command::Version { http_addr } => {
            println!("weft {}", env!("CARGO_PKG_VERSION"));
            match weft::cli::report_format(&http_addr, "{{.Version}}") {
                Ok(v) => println!("router {}", v.trim()),
                Err(e) => println!("router: {e}"),
            }
            Ok(())
        }
        Command::Rmpeer { names, http_addr } => {
            per_name("rmpeer", &names, |n| weft::cli::rmpeer(&http_addr, n))
        }
        Command::ForgetKey { names, http_addr } => per_name("forget-key", &names, |n| {
            weft::cli::forget_key(&http_addr, n)
        }),
        Command::InstallCni {
            bin_dir,
            conf_dir,
            plugin,
        } => {
            let plugin = match plugin {
                Some(p) => p,
                None => std::env::current_exe()
                    .context("where is this program")?
                    .with_file_name("weft-cni"),
            };
            let done = weft::install::install(&weft::install::InstallOptions {
                bin_dir,
                conf_dir,
                plugin,
            })?;
            for p in &done.plugins {
                println!("installed {}", p.display());
            }
            match &done.conflist {
                weft::install::Conflist::Written(p) => println!("wrote {}", p.display()),
                weft::install::Conflist::Kept(p) => {
                    println!("kept {} (it runs weft's plugin)", p.display())
                }
            }
            for p in &done.shadowing {
                eprintln!(
                    "warning: {} sorts first and is another network's: the runtime attaches pods with it until it is removed",
                    p.display()
                );
            }
            Ok(())
        }
        Command::Reset => {
            weft::io::nft::remove()?;
            println!("removed nftables table ip {}", weft::core::nat::TABLE);
            Ok(())
        }
        Command::Demo { nodes, pods } => {
            let ok = weft::demo::run(weft::demo::DemoOptions {
                nodes,
                pods_per_node: pods,
            })?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// Runs a per-peer CLI call for each name, printing each answer; exits 1 if any failed.
fn per_name(
    verb: &str,
    names: &[String],
    call: impl Fn(&str) -> Result<String, weft::cli::CliError>,
) -> anyhow::Result<()> {
    let mut failed = 0;
    for name in names {
        match call(name) {
            Ok(text) => println!("{}", text.trim_end()),
            Err(e) => {
                eprintln!("weft {verb} {name}: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<std::ffi::OsString> {
        v.iter().map(|s| s.into()).collect()
    }

    #[test]
    fn extra_args_go_first_so_the_command_line_wins() {
        let got = args_with_extra(
            os(&["weft", "router", "--mtu", "1400", "10.0.0.2"]),
            Some(" --conn-limit 30   --mtu 1300 ".into()),
        );
        assert_eq!(
            got,
            os(&[
                "weft",
                "router",
                "--conn-limit",
                "30",
                "--mtu",
                "1300",
                "--mtu",
                "1400",
                "10.0.0.2"
            ])
        );
        let cli = Cli::try_parse_from(got).unwrap();
        let Command::Router(r) = cli.command else {
            panic!("router")
        };
        assert_eq!((r.mtu, r.conn_limit), (Some(1400), 30));
        // Only the router takes them.
        let status = os(&["weft", "status"]);
        assert_eq!(args_with_extra(status.clone(), Some("--x".into())), status);
    }
}
