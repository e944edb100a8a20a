//! The sni-proxy binary: flags, then [`sni_proxy::Proxy`] under `agentkit::process::main`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sni_proxy::{Config, Proxy};

/// One TLS-passthrough load balancer in front of every shoot kube-apiserver of a seed.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The YAML config file (see docs/sni-proxy.md).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the config file and exit: 0 if valid, 1 with the field at fault otherwise.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(error) => {
            eprintln!("sni-proxy: {}: {error}", args.config.display());
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        let source = match &config.kubernetes {
            Some(k) => {
                let mut parts = Vec::new();
                if k.istio_selector.is_some() {
                    parts.push("Istio objects".to_owned());
                }
                if let Some(g) = &k.gateway_api {
                    parts.push(format!("Gateway API class {}", g.gateway_class));
                }
                parts.push("CONNECT destinations".to_owned());
                format!(", routes from Kubernetes ({})", parts.join(", "))
            }
            None => String::new(),
        };
        println!(
            "{}: ok ({} listeners, {} routes{source})",
            args.config.display(),
            config.listeners.len(),
            config.routes.len()
        );
        return ExitCode::SUCCESS;
    }
    agentkit::process::main("sni-proxy", |shutdown| async move {
        let proxy = Proxy::bind(config, prometheus::Registry::new()).await?;
        proxy.run(shutdown, Some(args.config)).await;
        Ok(())
    })
}
