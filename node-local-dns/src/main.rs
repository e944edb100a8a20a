//! The node-local-dns binary: node-cache's flags, then [`app::run`] under
//! `agentkit::process::main` (logging, descriptor limit, runtime, signals, exit codes).

use std::process::ExitCode;

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
            return ExitCode::from(agentkit::process::EXIT_USAGE);
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
    agentkit::process::main("node-local-dns", |shutdown| app::run(flags, shutdown))
}
