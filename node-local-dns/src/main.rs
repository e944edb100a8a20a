//! The node-local-dns binary: node-cache's flags, logging, the runtime, then [`app::run`].

use std::process::ExitCode;

use agentkit::Shutdown;
use node_local_dns::{app, flags};

fn main() -> ExitCode {
    let flags = match flags::parse(std::env::args().skip(1)) {
        Ok(f) => f,
        Err(flags::FlagError::Help) => {
            print!("{}", flags::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("node-local-dns: {error}\n\n{}", flags::USAGE);
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("node-local-dns {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if flags.check {
        return match app::load(&flags) {
            Ok(loaded) => {
                let zones: Vec<String> = loaded
                    .config
                    .blocks
                    .iter()
                    .flat_map(|b| b.zones.iter().map(move |z| format!("{z}:{}", b.port)))
                    .collect();
                println!(
                    "{}: ok ({} server blocks: {})",
                    flags.conf.display(),
                    loaded.config.blocks.len(),
                    zones.join(" ")
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("node-local-dns: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    agentkit::log::init(agentkit::log::Format::from_env());
    // TOKIO_WORKER_THREADS sets the number of worker threads (default: one per core); cache
    // hits never reach the runtime, they are answered on the UDP worker threads.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("node-local-dns: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = Shutdown::new();
        shutdown.on_signals()?;
        app::run(flags, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("node-local-dns: {error:#}");
            ExitCode::FAILURE
        }
    }
}
