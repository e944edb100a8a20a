//! The one `main` of every agent binary: logging, the descriptor limit, the runtime, the
//! signals, the exit code. A binary parses its flags (usage errors exit with
//! [`EXIT_USAGE`]), then hands its serve function to [`main`].

use std::future::Future;
use std::process::ExitCode;

use tracing::{debug, warn};

use crate::Shutdown;

/// The exit code of a command line that could not be parsed (as Go's `flag` and clap use).
pub const EXIT_USAGE: u8 = 2;

/// Runs an agent: installs logging (`RUST_LOG`, `LOG_FORMAT`), raises the descriptor limit
/// ([`raise_nofile`]), starts a multi-threaded runtime (`TOKIO_WORKER_THREADS` sets its
/// size), turns SIGTERM and SIGINT into a graceful [`Shutdown`], and runs `serve` until it
/// returns. An error is printed as `name: error: cause: cause` and exits 1.
pub fn main<F, Fut>(name: &str, serve: F) -> ExitCode
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::log::init(crate::log::Format::from_env());
    match raise_nofile() {
        Ok(limit) => debug!(limit, "descriptor limit"),
        Err(error) => warn!(%error, "cannot raise the descriptor limit"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("{name}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = Shutdown::new();
        shutdown.on_signals()?;
        serve(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit and returns the new soft
/// limit. Every proxied connection takes two descriptors and every DNS miss or TCP query one;
/// the default soft limit (1024) is far below what a node or a seed needs, the hard limit is
/// what the operator allows.
pub fn raise_nofile() -> std::io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid, initialised struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads a valid, initialised struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_limit() {
        let raised = raise_nofile().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(raised, lim.rlim_cur);
    }
}
