//! Corefile text to [`Config`]: the subset of CoreDNS's configuration language that
//! node-local-dns understands, with CoreDNS's (Caddy v1's) lexing and each supported plugin's
//! argument rules.
//!
//! Three passes, each simple on its own:
//! 1. `lex`: whitespace-separated tokens with their file and line; `"…"` quotes (`\"` inside),
//!    `#` comments, and `{`/`}` as tokens of their own. `;` is *not* special, as in CoreDNS.
//!    `{$VAR}` and `{%VAR%}` inside a token are replaced by the environment variable.
//! 2. `import`: `import PATTERN` (a glob relative to the importing file's directory, or the
//!    name of a `(snippet) { … }`) is replaced by the tokens it names, like Caddy does: at the top
//!    level they are server blocks, inside a block directives. No match is fine for a glob; a
//!    file named without wildcards must exist; an import cycle is an error.
//! 3. `parse` and the `plugins` interpreters: server blocks of directive lines, each line
//!    a name, its arguments on the same line, and an optional `{ … }` block opened on that line.
//!
//! Only the plugins node-cache's Corefiles use are supported (`errors`, `cache`, `reload`,
//! `loop`, `bind`, `forward`, `prometheus`, `health`, `log`, `import`); any other directive is
//! an error rather than silently ignored, so a Corefile that relies on, say, `rewrite` fails
//! loudly at start-up and on reload. Every error names the file, the line and the directive.
//!
//! Each pass is a module of its own (`import` with the glob engine, Go's `filepath.Glob`;
//! `parse` with the zone keys; `plugins` with one interpreter per directive), and `values`
//! holds the argument forms used beyond one plugin: Go durations (node-cache's flags too),
//! `IP[:port]` (the template too) and resolv.conf nameservers. This module runs the passes and
//! is their public surface.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::config::{Config, Location, ServerBlock};

mod import;
mod lex;
mod parse;
mod plugins;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod test_util;
mod values;

pub use import::{MAX_EXPANDED_TOKENS, MAX_IMPORT_DEPTH};
pub use parse::MAX_BLOCK_DEPTH;
pub use plugins::{
    DEFAULT_HEALTH_ADDR, DEFAULT_PREFETCH_PERCENTAGE, DEFAULT_PREFETCH_WINDOW,
    DEFAULT_PROMETHEUS_ADDR, DEFAULT_RELOAD_INTERVAL, DEFAULT_RELOAD_JITTER, DEFAULT_SERVE_STALE,
    MAX_SERVFAIL_TTL, MAX_UPSTREAMS, MIN_RELOAD_INTERVAL, MIN_RELOAD_JITTER,
    PREFETCH_PERCENTAGE_RANGE,
};
pub(crate) use values::parse_host_port;
pub use values::{parse_go_duration, resolv_conf_nameservers};

use import::Expander;
use lex::lex;
use parse::{check_overlap, parse_server_block, Cursor};

/// Why a Corefile was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum CorefileError {
    /// A file (the Corefile, an imported file, a resolv.conf) could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a well-formed Corefile (quotes, braces, server block keys).
    #[error("{location}: {message}")]
    Syntax {
        /// Where.
        location: Location,
        /// What is wrong.
        message: String,
    },
    /// A directive node-local-dns does not support.
    #[error("{location}: unknown directive {name:?}{hint}")]
    UnknownDirective {
        /// Where.
        location: Location,
        /// The directive as written.
        name: String,
        /// A hint, empty or starting with a space.
        hint: String,
    },
    /// A supported directive with bad arguments or options.
    #[error("{location}: {directive}: {message}")]
    Directive {
        /// Where.
        location: Location,
        /// The directive (`forward`, `cache`, …).
        directive: String,
        /// What is wrong.
        message: String,
    },
    /// `import` reached a file that is already being imported.
    #[error("{location}: import: import cycle: {chain}")]
    ImportCycle {
        /// The `import` that closes the cycle.
        location: Location,
        /// The files of the cycle, `a -> b -> a`.
        chain: String,
    },
}

/// Reads the Corefile at `path`, resolves its imports, and parses it.
pub fn load(path: &Path) -> Result<Config, CorefileError> {
    let text = read(path)?;
    parse(&text, path)
}

/// Parses Corefile `text` that came from `file` (imports are resolved relative to its
/// directory), with `{$VAR}` taken from the process environment.
pub fn parse(text: &str, file: &Path) -> Result<Config, CorefileError> {
    parse_with_env(text, file, &|name| std::env::var(name).ok())
}

/// [`parse`] with the environment given as a function (for tests).
pub fn parse_with_env(
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, CorefileError> {
    let file = Rc::new(file.to_path_buf());
    let tokens = lex(text, &file, env)?;
    let mut expander = Expander {
        env,
        snippets: Vec::new(),
        stack: vec![canonical(&file).display().to_string()],
    };
    let tokens = expander.expand(tokens, 0)?;
    let mut cursor = Cursor {
        tokens: &tokens,
        pos: 0,
        file: &file,
    };
    let mut blocks: Vec<ServerBlock> = Vec::new();
    while cursor.peek().is_some() {
        let block = parse_server_block(&mut cursor)?;
        check_overlap(&blocks, &block)?;
        blocks.push(block);
    }
    Ok(Config { blocks })
}

fn read(path: &Path) -> Result<String, CorefileError> {
    std::fs::read_to_string(path).map_err(|source| CorefileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
