//! `konnectivity-server`: upstream `proxy-server`'s flags, this project's server.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let flags = match konnectivity::flags::ServerFlags::try_parse() {
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
    agentkit::process::main("konnectivity-server", move |shutdown| async move {
        let config = flags.config()?;
        konnectivity::server::run(config, prometheus::Registry::new(), shutdown, |_| {}).await
    })
}
