//! The log-shipper binary: flags, then the agent under `agentkit::process::main`, or the
//! operators' `query` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log_shipper::Config;

/// Container logs from every seed node to each shoot's log store.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    /// The YAML config file (see log-shipper/example.yaml).
    #[arg(long, value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// Validate the config file and exit: 0 if valid, 1 with the field at fault otherwise.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a shoot's (or the seed's) log lines from its store: Loki, Vali or VictoriaLogs.
    Query(log_shipper::query::Args),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let path = match (args.command, args.config) {
        (Some(Command::Query(query)), _) => return log_shipper::query::main(query),
        (None, Some(path)) => path,
        // clap requires --config without a subcommand.
        (None, None) => return ExitCode::from(2),
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(error) => {
            eprintln!("log-shipper: {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        println!(
            "{}: ok (input {}, seed store {} {}, shoot stores {} {}, lifecycle {})",
            path.display(),
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
        Ok(log_shipper::run::run(config, Some(path), shutdown).await?)
    })
}
