//! The open-file limit. Every socket an agent holds is a descriptor, and the soft
//! `RLIMIT_NOFILE` a process inherits is often 1024 (systemd, most container runtimes) while
//! the hard limit is far higher. An agent that runs into the soft limit fails with EMFILE for
//! every new socket, cached answers and health probes included; so each agent raises the soft
//! limit to the hard one at start, and sizes its own caps well below that.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Returns the soft limit before and
/// after (equal when it already was the hard limit). Needs no privilege: only the hard limit
/// needs `CAP_SYS_RESOURCE` to go up, and it is left alone.
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let mut limit = get_nofile()?;
    let old = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        set_nofile(&limit)?;
    }
    Ok((old, limit.rlim_cur))
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one `rlimit` into the struct we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

fn set_nofile(limit: &libc::rlimit) -> io::Result<()> {
    // SAFETY: setrlimit(2) only reads the initialised `rlimit` behind the pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn raises_the_soft_limit_to_the_hard_one() {
        let before = get_nofile().unwrap();
        // Lower the soft limit a little (never the hard one, which could not go back up), so
        // there is something to raise even where soft already equals hard.
        if before.rlim_max > 256 {
            let lowered = libc::rlimit {
                rlim_cur: before.rlim_cur.min(before.rlim_max - 1),
                rlim_max: before.rlim_max,
            };
            set_nofile(&lowered).unwrap();
            let (old, new) = raise_nofile().unwrap();
            assert_eq!(old, lowered.rlim_cur);
            assert_eq!(new, before.rlim_max);
        }
        let after = get_nofile().unwrap();
        assert_eq!(after.rlim_cur, after.rlim_max, "soft is the hard limit now");
        assert_eq!(
            after.rlim_max, before.rlim_max,
            "the hard limit is untouched"
        );
        // Raising again changes nothing.
        assert_eq!(raise_nofile().unwrap(), (after.rlim_max, after.rlim_max));
    }
}
