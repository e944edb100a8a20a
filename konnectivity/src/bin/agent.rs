//! `konnectivity-agent`: upstream `proxy-agent`'s flags, this project's agent.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let flags = match konnectivity::flags::AgentFlags::try_parse() {
        Ok(flags) => flags,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(agentkit::process::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    agentkit::process::main("konnectivity-agent", move |shutdown| async move {
        let config = flags.config()?;
        konnectivity::agent::run(config, prometheus::Registry::new(), shutdown, |_, _| {}).await
    })
}
