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
enum Command {
    /// Run the per-node daemon.
    Router(RouterArgs),
    /// Print the router's status (from its HTTP API).
    Status {
        /// peers | connections | ipam | targets | routes
        what: Option<String>,
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Print the router's full state as JSON.
    Report {
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Take over the address ranges of a peer that is gone for good.
    Rmpeer {
        name: String,
        #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = weft::config::DEFAULT_HTTP_ADDR)]
        http_addr: String,
    },
    /// Build a local cluster in network namespaces, attach pods through weft-cni, send
    /// traffic between all of them and print the result (needs root).
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Router(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let hostname = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default();
            let cfg = args.validate(&hostname)?;
            weft::router::run(cfg).context("weft router failed")
        }
        Command::Status { what, http_addr } => {
            let text = weft::cli::status(&http_addr, what.as_deref())?;
            print!("{text}");
            Ok(())
        }
        Command::Report { http_addr } => {
            let text = weft::cli::report(&http_addr)?;
            println!("{}", text.trim_end());
            Ok(())
        }
        Command::Rmpeer { name, http_addr } => {
            let text = weft::cli::rmpeer(&http_addr, &name)?;
            println!("{}", text.trim_end());
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
