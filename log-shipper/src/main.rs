//! The log-shipper binary: flags, then the agent under `agentkit::process::main`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use log_shipper::Config;

/// Container logs from every seed node to each shoot's log store.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The YAML config file (see log-shipper/example.yaml).
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
            eprintln!("log-shipper: {}: {error}", args.config.display());
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        println!(
            "{}: ok (input {}, seed store {} {}, shoot stores {} {}, lifecycle {})",
            args.config.display(),
            config.input.path.display(),
            config.seed.protocol.as_str(),
            config.seed.url.as_str(),
            config.shoot.protocol.as_str(),
            config.shoot.url.as_str(),
            if config.kubernetes.is_some() {
                "from Cluster resources"
            } else {
                "every shoot ready"
            }
        );
        return ExitCode::SUCCESS;
    }
    agentkit::process::main("log-shipper", |shutdown| async move {
        Ok(log_shipper::run::run(config, Some(args.config), shutdown).await?)
    })
}
