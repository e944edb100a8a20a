//! The sni-proxy binary: flags, logging, then [`sni_proxy::Proxy`].

use std::path::PathBuf;
use std::process::ExitCode;

use agentkit::Shutdown;
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
        println!(
            "{}: ok ({} listeners, {} routes)",
            args.config.display(),
            config.listeners.len(),
            config.routes.len()
        );
        return ExitCode::SUCCESS;
    }
    agentkit::log::init(agentkit::log::Format::from_env());
    raise_fd_limit();
    // TOKIO_WORKER_THREADS sets the number of worker threads (default: one per core).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("sni-proxy: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let proxy = Proxy::bind(config, prometheus::Registry::new()).await?;
        let shutdown = Shutdown::new();
        shutdown.on_signals()?;
        proxy.run(shutdown, Some(args.config)).await;
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sni-proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every connection takes two descriptors; raise the soft limit to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
