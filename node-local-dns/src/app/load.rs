//! Reading the Corefile as node-cache does: fill the template's `__PILLAR__` variables if there
//! is a template, write the result, parse it. Blocking (files): the agent calls it before it
//! serves and from the reloader, on the blocking pool.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::config::Config;
use crate::flags::{Flags, DEFAULT_KUBE_DNS_DIR};
use crate::{corefile, template};

/// The node's resolver file, read for `__PILLAR__UPSTREAM__SERVERS__`. The environment
/// variable `NODE_LOCAL_DNS_RESOLV_CONF` points elsewhere (for tests).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// A Corefile read (and rendered from the template, if there is one) and parsed.
#[derive(Debug)]
pub struct Loaded {
    /// The parsed config.
    pub config: Config,
    /// The Corefile text it came from.
    pub text: String,
}

/// Reads the Corefile the way node-cache does: if `-basecorefile` exists, fill its
/// `__PILLAR__` variables and write the result to `-conf`; then parse `-conf`.
pub fn load(flags: &Flags) -> anyhow::Result<Loaded> {
    if flags.base_corefile.exists() {
        let base = std::fs::read_to_string(&flags.base_corefile)
            .with_context(|| format!("{}", flags.base_corefile.display()))?;
        let kube_dns_dir = flags.kube_dns_dir.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_KUBE_DNS_DIR);
            default.is_dir().then_some(default)
        });
        let resolv_conf = std::env::var_os("NODE_LOCAL_DNS_RESOLV_CONF")
            .map_or_else(|| PathBuf::from(RESOLV_CONF), PathBuf::from);
        let pillars = template::pillars(
            &flags.local_ips,
            &flags.upstream_service,
            |name| std::env::var(name).ok(),
            kube_dns_dir.as_deref(),
            &resolv_conf,
        )
        .context("filling the Corefile template")?;
        let text = template::render(&base, &pillars);
        let current = std::fs::read_to_string(&flags.conf).unwrap_or_default();
        if current != text {
            std::fs::write(&flags.conf, &text)
                .with_context(|| format!("writing {}", flags.conf.display()))?;
        }
        let config = corefile::parse(&text, &flags.conf)?;
        return Ok(Loaded { config, text });
    }
    let text = std::fs::read_to_string(&flags.conf)
        .with_context(|| format!("reading {}", flags.conf.display()))?;
    let config = corefile::parse(&text, &flags.conf)?;
    Ok(Loaded { config, text })
}
