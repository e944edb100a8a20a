//! Corefile text to [`Config`]: the subset of CoreDNS's configuration language that
//! node-local-dns understands, with CoreDNS's (Caddy v1's) lexing and each supported plugin's
//! argument rules.
//!
//! Three passes, each simple on its own:
//! 1. `lex`: whitespace-separated tokens with their file and line; `"…"` quotes (`\"` inside),
//!    `#` comments, and `{`/`}` as tokens of their own. `;` is *not* special, as in CoreDNS.
//!    `{$VAR}` and `{%VAR%}` inside a token are replaced by the environment variable.
//! 2. `expand`: `import PATTERN` (a glob relative to the importing file's directory, or the
//!    name of a `(snippet) { … }`) is replaced by the tokens it names, like Caddy does: at the top
//!    level they are server blocks, inside a block directives. No match is fine for a glob; a
//!    file named without wildcards must exist; an import cycle is an error.
//! 3. `parse_items` and the plugin interpreters: server blocks of directive lines, each line
//!    a name, its arguments on the same line, and an optional `{ … }` block opened on that line.
//!
//! Only the plugins node-cache's Corefiles use are supported (`errors`, `cache`, `reload`,
//! `loop`, `bind`, `forward`, `prometheus`, `health`, `log`, `import`); any other directive is
//! an error rather than silently ignored, so a Corefile that relies on, say, `rewrite` fails
//! loudly at start-up and on reload. Every error names the file, the line and the directive.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use crate::cache::{self, Limits, Prefetch, ServeStale, StaleMode};
use crate::config::{self, Config, Forward, Location, Reload, ServerBlock, DEFAULT_PORT};

/// CoreDNS's `forward` accepts at most this many upstreams.
pub const MAX_UPSTREAMS: usize = 15;
/// `prometheus` without an address: CoreDNS's `localhost:9153`.
pub const DEFAULT_PROMETHEUS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9153);
/// `health` without an address: CoreDNS's `:8080`.
pub const DEFAULT_HEALTH_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080);
/// `reload` default check interval (CoreDNS).
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(30);
/// `reload` default jitter (CoreDNS).
pub const DEFAULT_RELOAD_JITTER: Duration = Duration::from_secs(15);
/// `reload`: the smallest interval CoreDNS accepts.
pub const MIN_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// `reload`: the smallest jitter CoreDNS accepts, other than zero (no jitter).
pub const MIN_RELOAD_JITTER: Duration = Duration::from_secs(1);
/// `cache { prefetch AMOUNT }` default window (CoreDNS: 1 minute).
pub const DEFAULT_PREFETCH_WINDOW: Duration = Duration::from_secs(60);
/// `cache { prefetch AMOUNT DURATION }` default percentage (CoreDNS: 10 %).
pub const DEFAULT_PREFETCH_PERCENTAGE: u8 = 10;
/// `cache { prefetch … PERCENTAGE% }` range CoreDNS accepts.
pub const PREFETCH_PERCENTAGE_RANGE: std::ops::RangeInclusive<u8> = 10..=90;
/// `cache { serve_stale }` default maximum staleness (CoreDNS: 1 hour).
pub const DEFAULT_SERVE_STALE: Duration = Duration::from_secs(3600);
/// `cache { servfail DURATION }` maximum (CoreDNS: 5 minutes).
pub const MAX_SERVFAIL_TTL: Duration = Duration::from_secs(300);
/// `import` nesting deeper than this is refused (a cycle is reported before that).
pub const MAX_IMPORT_DEPTH: usize = 32;
/// A Corefile whose imports expand to more tokens than this is refused (snippets importing
/// snippets twice each grow exponentially).
pub const MAX_EXPANDED_TOKENS: usize = 50_000;
/// `{` nesting deeper than this is refused (no supported plugin needs more than 2).
pub const MAX_BLOCK_DEPTH: usize = 8;

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

// ---------------------------------------------------------------------------------------------
// Lexing.

/// One token with where it was written.
#[derive(Debug, Clone)]
struct Token {
    text: String,
    line: usize,
    file: Rc<PathBuf>,
    /// Written in quotes: never a brace, a comment or a keyword.
    quoted: bool,
}

impl Token {
    fn location(&self) -> Location {
        Location {
            file: (*self.file).clone(),
            line: self.line,
        }
    }

    fn is(&self, text: &str) -> bool {
        !self.quoted && self.text == text
    }

    fn same_line(&self, other: &Token) -> bool {
        self.line == other.line && Rc::ptr_eq(&self.file, &other.file)
    }
}

fn lex(
    text: &str,
    file: &Rc<PathBuf>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Token>, CorefileError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let mut current = String::new();
    let mut start_line = 1;
    let mut in_comment = false;
    let push = |tokens: &mut Vec<Token>, text: &mut String, line: usize, quoted: bool| {
        tokens.push(Token {
            text: substitute_env(&std::mem::take(text), env),
            line,
            file: Rc::clone(file),
            quoted,
        });
    };
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
            in_comment = false;
        }
        if in_comment {
            continue;
        }
        if c.is_whitespace() {
            if !current.is_empty() {
                push(&mut tokens, &mut current, start_line, false);
            }
            continue;
        }
        if c == '#' {
            if !current.is_empty() {
                push(&mut tokens, &mut current, start_line, false);
            }
            in_comment = true;
            continue;
        }
        if c == '"' && current.is_empty() {
            start_line = line;
            loop {
                match chars.next() {
                    None => {
                        return Err(CorefileError::Syntax {
                            location: Location {
                                file: (**file).clone(),
                                line: start_line,
                            },
                            message: "unterminated quoted string".to_owned(),
                        })
                    }
                    Some('\\') if chars.peek() == Some(&'"') => {
                        chars.next();
                        current.push('"');
                    }
                    Some('"') => break,
                    Some(c) => {
                        if c == '\n' {
                            line += 1;
                        }
                        current.push(c);
                    }
                }
            }
            push(&mut tokens, &mut current, start_line, true);
            continue;
        }
        if current.is_empty() {
            start_line = line;
        }
        current.push(c);
    }
    if !current.is_empty() {
        push(&mut tokens, &mut current, start_line, false);
    }
    Ok(tokens)
}

/// Replaces `{$NAME}` and `{%NAME%}` with the variable's value (empty when unset), as
/// CoreDNS does.
fn substitute_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
    if !text.contains("{$") && !text.contains("{%") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let (close, name) = match after.chars().next() {
            Some('$') => match after.find('}') {
                Some(end) => (end, &after[1..end]),
                None => break,
            },
            Some('%') => match after[1..].find("%}") {
                Some(end) => (end + 2, &after[1..end + 1]),
                None => break,
            },
            _ => {
                out.push('{');
                rest = after;
                continue;
            }
        };
        if name.is_empty() {
            out.push('{');
            rest = after;
            continue;
        }
        out.push_str(&env(name).unwrap_or_default());
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Imports and snippets.

struct Expander<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    /// `(name) { … }` definitions seen so far, with their body tokens.
    snippets: Vec<(String, Vec<Token>)>,
    /// Files and snippets being imported, outermost first (canonical paths; snippets as
    /// `(name)`).
    stack: Vec<String>,
}

impl Expander<'_> {
    fn expand(&mut self, tokens: Vec<Token>, depth: usize) -> Result<Vec<Token>, CorefileError> {
        let mut out: Vec<Token> = Vec::with_capacity(tokens.len());
        let mut level = 0usize;
        let mut i = 0;
        while i < tokens.len() {
            let token = &tokens[i];
            let line_start = i == 0
                || !tokens[i - 1].same_line(token)
                || tokens[i - 1].is("{")
                || tokens[i - 1].is("}");
            // A snippet definition: `(name) {` at the top level.
            if level == 0
                && line_start
                && !token.quoted
                && token.text.len() > 2
                && token.text.starts_with('(')
                && token.text.ends_with(')')
                && tokens.get(i + 1).is_some_and(|t| t.is("{"))
            {
                let name = token.text[1..token.text.len() - 1].to_owned();
                let (body, end) = snippet_body(&tokens, i + 1)?;
                self.snippets.retain(|(n, _)| *n != name);
                self.snippets.push((name, body));
                i = end + 1;
                continue;
            }
            if line_start && token.is("import") {
                let mut args = Vec::new();
                let mut j = i + 1;
                while let Some(arg) = tokens.get(j) {
                    if !arg.same_line(token) || arg.is("{") || arg.is("}") {
                        break;
                    }
                    args.push(arg);
                    j += 1;
                }
                if args.len() != 1 {
                    return Err(directive_error(
                        token,
                        "import",
                        format!("want one file pattern or snippet name, got {}", args.len()),
                    ));
                }
                let imported = self.import(token, &args[0].text, depth)?;
                if out.len() + imported.len() > MAX_EXPANDED_TOKENS {
                    return Err(directive_error(
                        token,
                        "import",
                        format!("imports expand to more than {MAX_EXPANDED_TOKENS} tokens"),
                    ));
                }
                out.extend(imported);
                i = j;
                continue;
            }
            if token.is("{") {
                level += 1;
            } else if token.is("}") {
                level = level.saturating_sub(1);
            }
            out.push(token.clone());
            i += 1;
        }
        Ok(out)
    }

    fn import(
        &mut self,
        at: &Token,
        pattern: &str,
        depth: usize,
    ) -> Result<Vec<Token>, CorefileError> {
        if depth >= MAX_IMPORT_DEPTH {
            return Err(directive_error(
                at,
                "import",
                format!("imports nested deeper than {MAX_IMPORT_DEPTH}"),
            ));
        }
        if let Some((name, body)) = self
            .snippets
            .iter()
            .find(|(name, _)| name == pattern)
            .cloned()
        {
            return self.nested(at, format!("({name})"), body, depth);
        }
        let base = at.file.parent().unwrap_or(Path::new(""));
        let full = if Path::new(pattern).is_absolute() {
            PathBuf::from(pattern)
        } else {
            base.join(pattern)
        };
        let files = if has_glob_meta(pattern) {
            glob(&full)
        } else if full.is_file() {
            vec![full.clone()]
        } else {
            return Err(directive_error(
                at,
                "import",
                format!("{} does not exist", full.display()),
            ));
        };
        let mut out = Vec::new();
        for path in files {
            let text = read(&path)?;
            let file = Rc::new(path.clone());
            let tokens = lex(&text, &file, self.env)?;
            let key = canonical(&path).display().to_string();
            out.extend(self.nested(at, key, tokens, depth)?);
        }
        Ok(out)
    }

    fn nested(
        &mut self,
        at: &Token,
        key: String,
        tokens: Vec<Token>,
        depth: usize,
    ) -> Result<Vec<Token>, CorefileError> {
        if let Some(first) = self.stack.iter().position(|p| *p == key) {
            let mut chain: Vec<String> = self.stack[first..].to_vec();
            chain.push(key);
            return Err(CorefileError::ImportCycle {
                location: at.location(),
                chain: chain.join(" -> "),
            });
        }
        self.stack.push(key);
        let result = self.expand(tokens, depth + 1);
        self.stack.pop();
        result
    }
}

/// The tokens between the `{` at `open` and its `}`, and the index of that `}`.
fn snippet_body(tokens: &[Token], open: usize) -> Result<(Vec<Token>, usize), CorefileError> {
    let mut level = 0usize;
    for (i, token) in tokens.iter().enumerate().skip(open) {
        if token.is("{") {
            level += 1;
        } else if token.is("}") {
            level -= 1;
            if level == 0 {
                return Ok((tokens[open + 1..i].to_vec(), i));
            }
        }
    }
    Err(CorefileError::Syntax {
        location: tokens[open].location(),
        message: "snippet: unclosed '{'".to_owned(),
    })
}

fn has_glob_meta(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// The files matching `pattern` (Go `filepath.Glob` syntax: `*`, `?`, `[…]`, in any path
/// component), sorted; directories and unreadable paths are left out.
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let mut current: Vec<PathBuf> = vec![PathBuf::new()];
    let components: Vec<_> = pattern.components().collect();
    for (index, component) in components.iter().enumerate() {
        let last = index + 1 == components.len();
        let part = component.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for dir in &current {
            if !has_glob_meta(&part) {
                let path = dir.join(component.as_os_str());
                if path.exists() {
                    next.push(path);
                }
                continue;
            }
            let listing = if dir.as_os_str().is_empty() {
                std::fs::read_dir(".")
            } else {
                std::fs::read_dir(dir)
            };
            let Ok(listing) = listing else { continue };
            let mut names: Vec<String> = listing
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| glob_match(&part, name))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|name| dir.join(name)));
        }
        if !last {
            next.retain(|p| p.is_dir());
        }
        current = next;
    }
    current.retain(|p| p.is_file());
    current
}

/// One element of a glob pattern.
#[derive(Debug)]
enum GlobElem {
    /// `*`: any run of characters.
    Star,
    /// `?`: one character.
    Any,
    /// A literal character.
    Lit(char),
    /// `[…]`: one character in (or, negated, not in) the ranges.
    Class(bool, Vec<(char, char)>),
}

impl GlobElem {
    fn matches(&self, c: char) -> bool {
        match self {
            GlobElem::Star | GlobElem::Any => true,
            GlobElem::Lit(l) => *l == c,
            GlobElem::Class(negate, ranges) => {
                ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negate
            }
        }
    }
}

/// Compiles a pattern; None if it is malformed (an unclosed `[`), which matches nothing,
/// as Go's `filepath.Glob` ignores malformed patterns' I/O and reports `ErrBadPattern`.
fn compile_glob(pattern: &str) -> Option<Vec<GlobElem>> {
    let mut elems = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => {
                if !matches!(elems.last(), Some(GlobElem::Star)) {
                    elems.push(GlobElem::Star);
                }
            }
            '?' => elems.push(GlobElem::Any),
            '\\' => elems.push(GlobElem::Lit(chars.next()?)),
            '[' => {
                let negate = matches!(chars.peek(), Some('^'));
                if negate {
                    chars.next();
                }
                let mut ranges = Vec::new();
                loop {
                    let mut lo = chars.next()?;
                    if lo == ']' && !ranges.is_empty() {
                        break;
                    }
                    if lo == '\\' {
                        lo = chars.next()?;
                    }
                    let mut hi = lo;
                    if chars.peek() == Some(&'-') {
                        chars.next();
                        hi = chars.next()?;
                        if hi == '\\' {
                            hi = chars.next()?;
                        }
                    }
                    ranges.push((lo, hi));
                }
                elems.push(GlobElem::Class(negate, ranges));
            }
            c => elems.push(GlobElem::Lit(c)),
        }
    }
    Some(elems)
}

/// Go's `filepath.Match` for one path component, in O(pattern × name) time.
fn glob_match(pattern: &str, name: &str) -> bool {
    let Some(elems) = compile_glob(pattern) else {
        return false;
    };
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    // The last `*` seen and the name position it is currently assumed to cover up to.
    let mut backtrack: Option<(usize, usize)> = None;
    while n < name.len() {
        match elems.get(p) {
            Some(GlobElem::Star) => {
                backtrack = Some((p, n));
                p += 1;
            }
            Some(elem) if elem.matches(name[n]) => {
                p += 1;
                n += 1;
            }
            _ => match backtrack {
                Some((star, covered)) => {
                    p = star + 1;
                    n = covered + 1;
                    backtrack = Some((star, covered + 1));
                }
                None => return false,
            },
        }
    }
    elems[p..].iter().all(|e| matches!(e, GlobElem::Star))
}

// ---------------------------------------------------------------------------------------------
// Structure: server blocks of directive lines.

struct Cursor<'t> {
    tokens: &'t [Token],
    pos: usize,
    file: &'t Rc<PathBuf>,
}

impl<'t> Cursor<'t> {
    fn peek(&self) -> Option<&'t Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<&'t Token> {
        let token = self.tokens.get(self.pos)?;
        self.pos += 1;
        Some(token)
    }

    fn end_location(&self) -> Location {
        match self.tokens.last() {
            Some(t) => t.location(),
            None => Location {
                file: (**self.file).clone(),
                line: 1,
            },
        }
    }
}

/// One directive line: `name args… [{ items… }]`.
#[derive(Debug)]
struct Item<'t> {
    /// The directive whose block this line is in (None: a directive of a server block).
    parent: Option<&'t Token>,
    name: &'t Token,
    args: Vec<&'t Token>,
    block: Option<Vec<Item<'t>>>,
}

impl Item<'_> {
    fn arg_texts(&self) -> Vec<&str> {
        self.args.iter().map(|t| t.text.as_str()).collect()
    }

    /// An error at this line, named after the directive (`cache: success: …` for an option).
    fn error(&self, message: impl Into<String>) -> CorefileError {
        match self.parent {
            None => directive_error(self.name, &self.name.text, message.into()),
            Some(parent) => directive_error(
                self.name,
                &parent.text,
                format!("{}: {}", self.name.text, message.into()),
            ),
        }
    }

    fn no_block(&self) -> Result<(), CorefileError> {
        match &self.block {
            Some(_) => Err(self.error("does not take a block")),
            None => Ok(()),
        }
    }

    fn block_items(&self) -> &[Item<'_>] {
        self.block.as_deref().unwrap_or(&[])
    }
}

fn directive_error(at: &Token, directive: &str, message: String) -> CorefileError {
    CorefileError::Directive {
        location: at.location(),
        directive: directive.to_owned(),
        message,
    }
}

/// Items until the `}` that closes the block opened on `opener`'s line; `parent` is the
/// directive that owns the block (None for a server block).
fn parse_items<'t>(
    cursor: &mut Cursor<'t>,
    parent: Option<&'t Token>,
    opener: &'t Token,
    what: &str,
    depth: usize,
) -> Result<Vec<Item<'t>>, CorefileError> {
    if depth > MAX_BLOCK_DEPTH {
        return Err(CorefileError::Syntax {
            location: opener.location(),
            message: format!("{what}: blocks nested deeper than {MAX_BLOCK_DEPTH}"),
        });
    }
    let mut items = Vec::new();
    loop {
        let Some(name) = cursor.next() else {
            return Err(CorefileError::Syntax {
                location: opener.location(),
                message: format!("{what}: unclosed '{{' (end of input before its '}}')"),
            });
        };
        if name.is("}") {
            return Ok(items);
        }
        if name.is("{") {
            return Err(CorefileError::Syntax {
                location: name.location(),
                message: format!(
                    "{what}: unexpected '{{' (a block opens at the end of its directive's line)"
                ),
            });
        }
        let mut args = Vec::new();
        let mut block = None;
        while let Some(next) = cursor.peek() {
            if next.is("}") || !next.same_line(name) && !next.is("{") {
                break;
            }
            if next.is("{") {
                let last = args.last().copied().unwrap_or(name);
                if !next.same_line(last) {
                    break;
                }
                cursor.next();
                block = Some(parse_items(
                    cursor,
                    Some(name),
                    name,
                    &name.text,
                    depth + 1,
                )?);
                break;
            }
            args.push(next);
            cursor.next();
        }
        items.push(Item {
            parent,
            name,
            args,
            block,
        });
    }
}

fn parse_server_block(cursor: &mut Cursor<'_>) -> Result<ServerBlock, CorefileError> {
    let mut keys = Vec::new();
    let opener = loop {
        match cursor.next() {
            None => {
                let location = keys
                    .first()
                    .map(|t: &&Token| t.location())
                    .unwrap_or_else(|| cursor.end_location());
                return Err(CorefileError::Syntax {
                    location,
                    message: "expected '{' after the server block keys".to_owned(),
                });
            }
            Some(t) if t.is("{") => break t,
            Some(t) if t.is("}") => {
                return Err(CorefileError::Syntax {
                    location: t.location(),
                    message: "unexpected '}' outside a server block".to_owned(),
                })
            }
            Some(t) => keys.push(t),
        }
    };
    let Some(first) = keys.first().copied() else {
        return Err(CorefileError::Syntax {
            location: opener.location(),
            message: "a server block needs at least one key (zone[:port]) before '{'".to_owned(),
        });
    };
    let what = format!(
        "server block {:?}",
        keys.iter()
            .map(|k| k.text.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let items = parse_items(cursor, None, first, &what, 1)?;

    let mut zones: Vec<String> = Vec::new();
    let mut port: Option<u16> = None;
    for key in &keys {
        for part in key.text.split(',').filter(|p| !p.is_empty()) {
            let (zone, key_port) = parse_key(key, part)?;
            let key_port = key_port.unwrap_or(DEFAULT_PORT);
            match port {
                Some(p) if p != key_port => {
                    return Err(CorefileError::Syntax {
                        location: key.location(),
                        message: format!(
                            "server block key {part:?}: all keys of one block must use the same port ({p} and {key_port})"
                        ),
                    })
                }
                _ => port = Some(key_port),
            }
            if !zones.contains(&zone) {
                zones.push(zone);
            }
        }
    }
    if zones.is_empty() {
        return Err(CorefileError::Syntax {
            location: first.location(),
            message: "a server block needs at least one key (zone[:port]) before '{'".to_owned(),
        });
    }
    let mut block = ServerBlock {
        zones,
        port: port.unwrap_or(DEFAULT_PORT),
        bind: Vec::new(),
        cache: None,
        forward: None,
        prometheus: None,
        health: None,
        errors: false,
        log: false,
        loop_detect: false,
        reload: None,
        fast_path: None,
        location: first.location(),
    };
    let mut seen: Vec<(String, usize)> = Vec::new();
    for item in &items {
        apply_directive(&mut block, item, &mut seen)?;
    }
    Ok(block)
}

/// `[dns://]zone[:port]` → (normalised zone, port).
fn parse_key(at: &Token, key: &str) -> Result<(String, Option<u16>), CorefileError> {
    let bad = |message: String| CorefileError::Syntax {
        location: at.location(),
        message: format!("server block key {key:?}: {message}"),
    };
    let mut rest = key;
    if let Some(index) = rest.find("://") {
        let scheme = rest[..index].to_ascii_lowercase();
        if scheme != "dns" {
            return Err(bad(format!(
                "transport {scheme}:// is not supported (only plain DNS, dns://)"
            )));
        }
        rest = &rest[index + 3..];
    }
    let (zone, port) = match rest.rfind(':') {
        Some(index) => {
            let port = &rest[index + 1..];
            let port: u16 = port
                .parse()
                .map_err(|_| bad(format!("{port:?} is not a port number")))?;
            (&rest[..index], Some(port))
        }
        None => (rest, None),
    };
    if zone.contains('/') {
        return Err(bad(
            "reverse zones written as CIDR are not supported; write the zone (e.g. 10.in-addr.arpa)"
                .to_owned(),
        ));
    }
    let zone = normalize_zone(zone).map_err(bad)?;
    Ok((zone, port))
}

/// Lower-case, absolute (trailing dot); `""` is refused, `"."` is the root.
fn normalize_zone(zone: &str) -> Result<String, String> {
    if zone.is_empty() {
        return Err("empty zone".to_owned());
    }
    if zone == "." {
        return Ok(".".to_owned());
    }
    let trimmed = zone.strip_suffix('.').unwrap_or(zone);
    if trimmed.len() > 253 {
        return Err(format!("zone {zone:?} is longer than 253 characters"));
    }
    for label in trimmed.split('.') {
        if label.is_empty() {
            return Err(format!("zone {zone:?} has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!(
                "zone {zone:?} has a label longer than 63 characters"
            ));
        }
        if label
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}' | '"' | '#'))
        {
            return Err(format!(
                "zone {zone:?} has characters a domain name cannot have"
            ));
        }
    }
    Ok(format!("{}.", trimmed.to_ascii_lowercase()))
}

/// `zone` is `parent` or below it.
fn zone_within(zone: &str, parent: &str) -> bool {
    parent == "." || zone == parent || zone.ends_with(&format!(".{parent}"))
}

/// Directives CoreDNS allows at most once per server block, and which of ours are such.
const ONCE: &[&str] = &[
    "errors",
    "cache",
    "reload",
    "loop",
    "forward",
    "prometheus",
    "health",
    "fastpath",
];

fn apply_directive(
    block: &mut ServerBlock,
    item: &Item<'_>,
    seen: &mut Vec<(String, usize)>,
) -> Result<(), CorefileError> {
    let name = item.name.text.as_str();
    if item.name.quoted {
        return Err(CorefileError::UnknownDirective {
            location: item.name.location(),
            name: name.to_owned(),
            hint: " (a directive is not quoted)".to_owned(),
        });
    }
    if ONCE.contains(&name) {
        if let Some((_, line)) = seen.iter().find(|(n, _)| *n == name) {
            return Err(item.error(format!(
                "given twice in one server block (first at line {line})"
            )));
        }
        seen.push((name.to_owned(), item.name.line));
    }
    match name {
        "errors" => {
            if item.args.len() > 1 {
                return Err(item.error("takes at most one argument"));
            }
            for option in item.block_items() {
                match option.name.text.as_str() {
                    "consolidate" | "stacktrace" => {}
                    other => {
                        return Err(option.error(format!(
                            "unknown option {other:?} of errors (want consolidate or stacktrace)"
                        )))
                    }
                }
            }
            block.errors = true;
        }
        "log" => block.log = true,
        "loop" => {
            if !item.args.is_empty() {
                return Err(item.error("takes no arguments"));
            }
            item.no_block()?;
            block.loop_detect = true;
        }
        "reload" => block.reload = Some(parse_reload(item)?),
        "fastpath" => {
            item.no_block()?;
            let (mode, interfaces) = match item.args.split_first() {
                Some((mode, interfaces)) if !interfaces.is_empty() => (mode, interfaces),
                _ => return Err(item.error("want a mode (tc or xdp) and at least one interface")),
            };
            let mode = mode.text.parse().map_err(|m: String| item.error(m))?;
            let interfaces = interfaces
                .iter()
                .map(|i| {
                    if i.text.is_empty() || i.text.len() > 15 || i.text.contains('/') {
                        Err(item.error(format!("{:?} is not an interface name", i.text)))
                    } else {
                        Ok(i.text.clone())
                    }
                })
                .collect::<Result<_, _>>()?;
            block.fast_path = Some(crate::config::FastPath { mode, interfaces });
        }
        "bind" => {
            item.no_block()?;
            if item.args.is_empty() {
                return Err(item.error("want at least one address"));
            }
            for arg in &item.args {
                let ip: IpAddr = arg.text.parse().map_err(|_| {
                    item.error(format!(
                        "{:?} is not an IP address (interface names are not supported)",
                        arg.text
                    ))
                })?;
                if !block.bind.contains(&ip) {
                    block.bind.push(ip);
                }
            }
        }
        "cache" => block.cache = Some(parse_cache(item, &block.zones)?),
        "forward" => block.forward = Some(parse_forward(item)?),
        "prometheus" => {
            item.no_block()?;
            block.prometheus = Some(match item.args.as_slice() {
                [] => DEFAULT_PROMETHEUS_ADDR,
                [addr] => parse_listen_addr(&addr.text).map_err(|m| item.error(m))?,
                _ => return Err(item.error("takes at most one address")),
            });
        }
        "health" => {
            block.health = Some(match item.args.as_slice() {
                [] => DEFAULT_HEALTH_ADDR,
                [addr] => parse_listen_addr(&addr.text).map_err(|m| item.error(m))?,
                _ => return Err(item.error("takes at most one address")),
            });
            for option in item.block_items() {
                match (option.name.text.as_str(), option.arg_texts().as_slice()) {
                    ("lameduck", [duration]) => {
                        parse_go_duration(duration).map_err(|m| option.error(m))?;
                    }
                    ("lameduck", _) => return Err(option.error("want one duration")),
                    (other, _) => {
                        return Err(option.error(format!(
                            "unknown option {other:?} of health (want lameduck)"
                        )))
                    }
                }
            }
        }
        _ => {
            let hint = if name.ends_with(';') || item.args.iter().any(|a| a.text.ends_with(';')) {
                " (';' does not separate directives in a Corefile: put each on its own line)"
            } else {
                " (node-local-dns supports errors, cache, reload, loop, bind, forward, prometheus, health, log, import, fastpath)"
            };
            return Err(CorefileError::UnknownDirective {
                location: item.name.location(),
                name: name.to_owned(),
                hint: hint.to_owned(),
            });
        }
    }
    Ok(())
}

/// A listen address: `IP:port`, `[v6]:port`, `:port` (every address), `localhost:port`.
fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = || format!("{text:?} is not a listen address (want [IP]:port)");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let ip = match host {
        "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ => return Err(bad()),
    };
    Ok(SocketAddr::new(ip, port))
}

fn parse_reload(item: &Item<'_>) -> Result<Reload, CorefileError> {
    item.no_block()?;
    let args = item.arg_texts();
    if args.len() > 2 {
        return Err(item.error("takes at most INTERVAL and JITTER"));
    }
    let mut interval = DEFAULT_RELOAD_INTERVAL;
    let mut jitter = DEFAULT_RELOAD_JITTER;
    if let Some(text) = args.first() {
        interval = parse_go_duration(text).map_err(|m| item.error(m))?;
        if interval < MIN_RELOAD_INTERVAL {
            return Err(item.error(format!(
                "interval {text} is below the minimum of {}s",
                MIN_RELOAD_INTERVAL.as_secs()
            )));
        }
    }
    if let Some(text) = args.get(1) {
        jitter = parse_go_duration(text).map_err(|m| item.error(m))?;
        // Zero turns jitter off; otherwise CoreDNS wants at least a second.
        if jitter != Duration::ZERO && jitter < MIN_RELOAD_JITTER {
            return Err(item.error(format!(
                "jitter {text} is below the minimum of {}s",
                MIN_RELOAD_JITTER.as_secs()
            )));
        }
    }
    // CoreDNS lowers a jitter above half the interval to half the interval.
    jitter = jitter.min(interval / 2);
    Ok(Reload { interval, jitter })
}

fn parse_seconds(item: &Item<'_>, text: &str, what: &str) -> Result<u64, CorefileError> {
    text.parse::<u64>()
        .map_err(|_| item.error(format!("{what} {text:?} is not a number of seconds")))
}

fn parse_cache(item: &Item<'_>, block_zones: &[String]) -> Result<cache::Policy, CorefileError> {
    let mut policy = cache::Policy::default();
    let mut args = item.arg_texts();
    if let Some(first) = args.first() {
        // As in CoreDNS: a first argument that is an integer is the TTL, anything else a zone.
        if let Ok(ttl) = first.parse::<i64>() {
            if ttl <= 0 {
                return Err(item.error(format!("TTL {ttl} can not be zero or negative")));
            }
            let ttl = Duration::from_secs(ttl.unsigned_abs());
            policy.success.max_ttl = ttl;
            policy.denial.max_ttl = ttl;
            args.remove(0);
        }
    }
    for text in &args {
        let zone = normalize_zone(text).map_err(|m| item.error(m))?;
        if let Some(uncovered) = block_zones.iter().find(|z| !zone_within(z, &zone)) {
            return Err(item.error(format!(
                "{text:?} is neither a TTL in seconds nor a zone covering the block's {uncovered} (caching part of a block is not supported)"            )));
        }
    }
    for option in item.block_items() {
        let oargs = option.arg_texts();
        match option.name.text.as_str() {
            kind @ ("success" | "denial") => {
                let limits = if kind == "success" {
                    &mut policy.success
                } else {
                    &mut policy.denial
                };
                parse_limits(option, &oargs, limits)?;
            }
            "prefetch" => {
                if oargs.is_empty() || oargs.len() > 3 {
                    return Err(option.error("want AMOUNT [DURATION [PERCENTAGE%]]"));
                }
                let amount: u32 = oargs[0].parse().map_err(|_| {
                    option.error(format!("amount {:?} is not a number", oargs[0]))
                })?;
                if amount == 0 {
                    return Err(option.error("amount must be at least 1"));
                }
                let mut prefetch = Prefetch {
                    amount,
                    window: DEFAULT_PREFETCH_WINDOW,
                    percentage: DEFAULT_PREFETCH_PERCENTAGE,
                };
                if let Some(text) = oargs.get(1) {
                    prefetch.window = parse_go_duration(text).map_err(|m| option.error(m))?;
                }
                if let Some(text) = oargs.get(2) {
                    let number = text.strip_suffix('%').ok_or_else(|| {
                        option.error(format!("percentage {text:?} must end with '%'"))
                    })?;
                    let pct: u8 = number
                        .parse()
                        .ok()
                        .filter(|p| PREFETCH_PERCENTAGE_RANGE.contains(p))
                        .ok_or_else(|| {
                            option.error(format!(
                                "percentage {text:?} is not in [{}%, {}%]",
                                PREFETCH_PERCENTAGE_RANGE.start(),
                                PREFETCH_PERCENTAGE_RANGE.end()
                            ))
                        })?;
                    prefetch.percentage = pct;
                }
                policy.prefetch = Some(prefetch);
            }
            "serve_stale" => {
                if oargs.len() > 2 {
                    return Err(option.error("want [DURATION] [immediate|verify]"));
                }
                let mut stale = ServeStale {
                    max_stale: DEFAULT_SERVE_STALE,
                    ttl: cache::DEFAULT_STALE_TTL,
                    mode: StaleMode::Immediate,
                    failure_recheck: cache::DEFAULT_FAILURE_RECHECK,
                };
                if let Some(text) = oargs.first() {
                    stale.max_stale = parse_go_duration(text).map_err(|m| option.error(m))?;
                }
                match oargs.get(1).copied() {
                    None | Some("immediate") => {}
                    Some("verify") => stale.mode = StaleMode::Verify,
                    Some(other) => {
                        return Err(option.error(format!(
                            "refresh mode {other:?} is neither immediate nor verify"
                        )))
                    }
                }
                policy.serve_stale = Some(stale);
            }
            "servfail" => {
                let [text] = oargs.as_slice() else {
                    return Err(option.error("want one duration"));
                };
                let ttl = parse_go_duration(text).map_err(|m| option.error(m))?;
                if ttl > MAX_SERVFAIL_TTL {
                    return Err(option.error(format!(
                        "{text} is above the maximum of {}m",
                        MAX_SERVFAIL_TTL.as_secs() / 60
                    )));
                }
                policy.servfail_ttl = ttl;
            }
            other @ ("disable" | "keepttl") => {
                return Err(option.error(format!(
                    "option {other:?} of cache is not supported by node-local-dns"
                )))
            }
            other => {
                return Err(option.error(format!(
                    "unknown option {other:?} of cache (want success, denial, prefetch, serve_stale or servfail)"
                )))
            }
        }
    }
    Ok(policy)
}

/// `success|denial CAPACITY [TTL [MINTTL]]`.
fn parse_limits(
    option: &Item<'_>,
    args: &[&str],
    limits: &mut Limits,
) -> Result<(), CorefileError> {
    if args.is_empty() || args.len() > 3 {
        return Err(option.error("want CAPACITY [TTL [MINTTL]]"));
    }
    let capacity: usize = args[0]
        .parse()
        .map_err(|_| option.error(format!("capacity {:?} is not a number", args[0])))?;
    if capacity == 0 {
        return Err(option.error("capacity must be at least 1"));
    }
    limits.capacity = capacity;
    if let Some(text) = args.get(1) {
        let ttl = parse_seconds(option, text, "TTL")?;
        if ttl == 0 {
            return Err(option.error("TTL can not be zero"));
        }
        limits.max_ttl = Duration::from_secs(ttl);
    }
    if let Some(text) = args.get(2) {
        limits.min_ttl = Duration::from_secs(parse_seconds(option, text, "minimum TTL")?);
    }
    Ok(())
}

fn parse_forward(item: &Item<'_>) -> Result<Forward, CorefileError> {
    let args = item.arg_texts();
    if args.len() < 2 {
        return Err(item.error("want FROM TO..."));
    }
    let from = normalize_zone(args[0]).map_err(|m| item.error(m))?;
    let mut to = Vec::new();
    let base = item.name.file.parent().unwrap_or(Path::new(""));
    for text in &args[1..] {
        to.extend(parse_upstream(item, text, base)?);
    }
    if to.len() > MAX_UPSTREAMS {
        return Err(item.error(format!(
            "{} upstreams, at most {MAX_UPSTREAMS} are allowed",
            to.len()
        )));
    }
    let mut forward = Forward::new(from, to);
    for option in item.block_items() {
        let oargs = option.arg_texts();
        let name = option.name.text.as_str();
        let no_args = || {
            if oargs.is_empty() {
                Ok(())
            } else {
                Err(option.error("takes no arguments"))
            }
        };
        let one_arg = || match oargs.as_slice() {
            [one] => Ok(*one),
            _ => Err(option.error("want one argument")),
        };
        match name {
            "force_tcp" => {
                no_args()?;
                forward.force_tcp = true;
            }
            "prefer_udp" => {
                no_args()?;
                forward.prefer_udp = true;
            }
            "expire" => {
                forward.expire = parse_go_duration(one_arg()?).map_err(|m| option.error(m))?
            }
            "read_timeout" => {
                forward.attempt_timeout =
                    parse_go_duration(one_arg()?).map_err(|m| option.error(m))?
            }
            "max_fails" => {
                let text = one_arg()?;
                forward.max_fails = text
                    .parse()
                    .map_err(|_| option.error(format!("{text:?} is not a number")))?;
            }
            "max_idle_conns" => {
                let text = one_arg()?;
                text.parse::<u32>()
                    .map_err(|_| option.error(format!("{text:?} is not a number")))?;
            }
            "health_check" => {
                let Some(text) = oargs.first() else {
                    return Err(option.error("want DURATION [no_rec] [domain NAME]"));
                };
                forward.health_check = parse_go_duration(text).map_err(|m| option.error(m))?;
                let mut rest = oargs[1..].iter();
                while let Some(word) = rest.next() {
                    match *word {
                        "no_rec" => forward.health_check_no_rec = true,
                        "domain" => {
                            let name = rest
                                .next()
                                .ok_or_else(|| option.error("domain wants a name"))?;
                            forward.health_check_domain =
                                normalize_zone(name).map_err(|m| option.error(m))?;
                        }
                        other => {
                            return Err(option.error(format!(
                                "unknown argument {other:?} (want no_rec or domain NAME)"
                            )))
                        }
                    }
                }
            }
            "policy" => {
                forward.policy = match one_arg()? {
                    "random" => config::Policy::Random,
                    "round_robin" => config::Policy::RoundRobin,
                    "sequential" => config::Policy::Sequential,
                    other => {
                        return Err(option.error(format!(
                            "unknown policy {other:?} (want random, round_robin or sequential)"
                        )))
                    }
                }
            }
            "max_concurrent" => {
                let text = one_arg()?;
                let n: usize = text
                    .parse()
                    .map_err(|_| option.error(format!("{text:?} is not a number")))?;
                forward.max_concurrent = (n > 0).then_some(n);
            }
            "except" => {
                if oargs.is_empty() {
                    return Err(option.error("want at least one zone"));
                }
                for zone in oargs {
                    let zone = normalize_zone(zone).map_err(|m| option.error(m))?;
                    if !forward.except.contains(&zone) {
                        forward.except.push(zone);
                    }
                }
            }
            "tls"
            | "tls_servername"
            | "next"
            | "failover"
            | "failfast_all_unhealthy_upstreams"
            | "source_address"
            | "max_connect_attempts" => {
                return Err(option.error(format!(
                    "option {name:?} of forward is not supported by node-local-dns"
                )))
            }
            other => return Err(option.error(format!("unknown option {other:?} of forward"))),
        }
    }
    if forward.force_tcp && forward.prefer_udp {
        return Err(item.error("force_tcp and prefer_udp can not both be set"));
    }
    Ok(forward)
}

/// One `forward` TO: `IP`, `IP:port`, `[v6]:port`, `dns://…`, or a resolv.conf-style file.
fn parse_upstream(
    item: &Item<'_>,
    text: &str,
    base: &Path,
) -> Result<Vec<SocketAddr>, CorefileError> {
    let mut rest = text;
    if let Some(index) = rest.find("://") {
        let scheme = rest[..index].to_ascii_lowercase();
        if scheme != "dns" {
            return Err(item.error(format!(
                "{text:?}: transport {scheme}:// is not supported (only plain DNS)"
            )));
        }
        rest = &rest[index + 3..];
    }
    if let Some(addr) = parse_host_port(rest) {
        return Ok(vec![addr]);
    }
    let path = if Path::new(rest).is_absolute() {
        PathBuf::from(rest)
    } else {
        base.join(rest)
    };
    if !text.contains("://") && path.is_file() {
        let content = read(&path)?;
        let servers = resolv_conf_nameservers(&content);
        if servers.is_empty() {
            return Err(item.error(format!("no nameservers found in {}", path.display())));
        }
        return Ok(servers
            .into_iter()
            .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
            .collect());
    }
    Err(item.error(format!(
        "{text:?} is not an upstream address (want IP[:port])"
    )))
}

/// `IP`, `IP:port` or `[v6]:port` (port 53 when not written).
pub(crate) fn parse_host_port(text: &str) -> Option<SocketAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, DEFAULT_PORT));
    }
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return inner
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, DEFAULT_PORT));
    }
    text.parse::<SocketAddr>().ok()
}

/// The `nameserver` addresses of a resolv.conf (entries that are not plain IPs, such as
/// scoped `fe80::1%eth0`, are left out).
pub fn resolv_conf_nameservers(content: &str) -> Vec<IpAddr> {
    content
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

/// A Go `time.ParseDuration` string (`500ms`, `1m30s`, `1.5h`, `0`); negative is refused.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (like 500ms, 30s, 1m30s)");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.starts_with('-') {
        return Err(format!("duration {text:?} can not be negative"));
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {text:?} is missing a unit (like s or ms)"))?;
        let number = &rest[..number_end];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(bad());
        }
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(bad)?;
        let mut scale = unit_nanos;
        for digit in frac.chars().take(30) {
            scale /= 10;
            nanos += u128::from(digit.to_digit(10).unwrap_or(0)) * scale;
        }
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(bad)?;
        if total_nanos > u128::from(u64::MAX) {
            return Err(bad());
        }
    }
    let nanos = u64::try_from(total_nanos).map_err(|_| bad())?;
    Ok(Duration::from_nanos(nanos))
}

/// Two blocks may not serve the same zone on the same port and address (CoreDNS refuses it).
fn check_overlap(existing: &[ServerBlock], block: &ServerBlock) -> Result<(), CorefileError> {
    for other in existing.iter().filter(|o| o.port == block.port) {
        let binds_overlap = other.bind.is_empty()
            || block.bind.is_empty()
            || other.bind.iter().any(|ip| block.bind.contains(ip));
        if !binds_overlap {
            continue;
        }
        if let Some(zone) = block.zones.iter().find(|z| other.zones.contains(z)) {
            return Err(CorefileError::Syntax {
                location: block.location.clone(),
                message: format!(
                    "zone {zone} on port {} is already served by the block at {}",
                    block.port, other.location
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse_str(text: &str) -> Result<Config, CorefileError> {
        parse_with_env(text, Path::new("Corefile"), &|_| None)
    }

    fn one(text: &str) -> ServerBlock {
        let mut config = parse_str(text).unwrap();
        assert_eq!(config.blocks.len(), 1);
        config.blocks.remove(0)
    }

    fn err(text: &str) -> String {
        parse_str(text).unwrap_err().to_string()
    }

    #[test]
    fn lexer_handles_quotes_comments_and_lines() {
        let file = Rc::new(PathBuf::from("f"));
        let tokens = lex("a \"b c\" # d e\n\"x\\\"y\"f#g\n{ }", &file, &|_| None).unwrap();
        let texts: Vec<_> = tokens
            .iter()
            .map(|t| (t.text.as_str(), t.line, t.quoted))
            .collect();
        assert_eq!(
            texts,
            vec![
                ("a", 1, false),
                ("b c", 1, true),
                ("x\"y", 2, true),
                ("f", 2, false),
                ("{", 3, false),
                ("}", 3, false)
            ]
        );
    }

    #[test]
    fn unterminated_quote_names_its_line() {
        assert_eq!(
            err(".:53 {\n log \"abc\n}"),
            "Corefile:2: unterminated quoted string"
        );
    }

    #[test]
    fn env_substitution() {
        let env = |name: &str| match name {
            "BIND" => Some("127.0.0.2".to_owned()),
            "PORT" => Some("5353".to_owned()),
            _ => None,
        };
        assert_eq!(substitute_env("{$BIND}", &env), "127.0.0.2");
        assert_eq!(substitute_env("a{%PORT%}b", &env), "a5353b");
        assert_eq!(substitute_env("x{$UNSET}y", &env), "xy");
        assert_eq!(substitute_env("{notenv}", &env), "{notenv}");
        assert_eq!(substitute_env("{$unterminated", &env), "{$unterminated");
        let config =
            parse_with_env(".:{$PORT} {\n bind {$BIND}\n}", Path::new("Corefile"), &env).unwrap();
        assert_eq!(config.blocks[0].port, 5353);
        assert_eq!(
            config.blocks[0].bind,
            vec!["127.0.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn keys_zones_and_ports() {
        let block = one("A.Local:5300 dns://b.local.:5300,c.local:5300 {\n}");
        assert_eq!(block.zones, vec!["a.local.", "b.local.", "c.local."]);
        assert_eq!(block.port, 5300);
        let block = one(". {\n}");
        assert_eq!((block.zones, block.port), (vec![".".to_owned()], 53));
        assert!(err("a:53 b:54 {\n}").contains("same port"));
        assert!(err("10.0.0.0/24 {\n}").contains("CIDR"));
        assert!(err("tls://.:853 {\n}").contains("tls://"));
        assert!(err("a..b {\n}").contains("empty label"));
        assert!(err(".:99999 {\n}").contains("not a port number"));
    }

    #[test]
    fn same_zone_and_port_twice_is_refused_unless_binds_differ() {
        let e = err(".:53 {\n}\n.:53 {\n}");
        assert!(e.starts_with("Corefile:3:"), "{e}");
        assert!(
            e.contains("already served by the block at Corefile:1"),
            "{e}"
        );
        parse_str(".:53 {\n bind 127.0.0.1\n}\n.:53 {\n bind 127.0.0.2\n}").unwrap();
        parse_str(".:53 {\n}\n.:54 {\n}").unwrap();
    }

    #[test]
    fn cache_forms() {
        let block = one(".:53 {\n cache\n}");
        assert_eq!(block.cache, Some(cache::Policy::default()));
        let policy = one(".:53 {\n cache 30\n}").cache.unwrap();
        assert_eq!(policy.success.max_ttl, Duration::from_secs(30));
        assert_eq!(policy.denial.max_ttl, Duration::from_secs(30));
        assert_eq!(policy.success.capacity, cache::DEFAULT_CAPACITY);
        assert_eq!(policy.success.min_ttl, cache::DEFAULT_MIN_TTL);
        // The first option on the brace line, the closing brace after the last one.
        let policy = one(".:53 {\n cache 60 { success 5000 30 2\n denial 100 5 }\n}")
            .cache
            .unwrap();
        assert_eq!(
            policy.success,
            Limits {
                capacity: 5000,
                max_ttl: Duration::from_secs(30),
                min_ttl: Duration::from_secs(2)
            }
        );
        assert_eq!(
            policy.denial,
            Limits {
                capacity: 100,
                max_ttl: Duration::from_secs(5),
                min_ttl: cache::DEFAULT_MIN_TTL
            }
        );
        let policy = one(
            ".:53 {\n cache {\n prefetch 3 30s 20%\n serve_stale 2h verify\n servfail 2s\n }\n}",
        )
        .cache
        .unwrap();
        assert_eq!(
            policy.prefetch,
            Some(Prefetch {
                amount: 3,
                window: Duration::from_secs(30),
                percentage: 20
            })
        );
        let stale = policy.serve_stale.unwrap();
        assert_eq!(
            (stale.max_stale, stale.mode),
            (Duration::from_secs(7200), StaleMode::Verify)
        );
        assert_eq!(policy.servfail_ttl, Duration::from_secs(2));
        let policy = one(".:53 {\n cache {\n prefetch 2\n serve_stale\n }\n}")
            .cache
            .unwrap();
        assert_eq!(policy.prefetch.unwrap().window, DEFAULT_PREFETCH_WINDOW);
        assert_eq!(policy.serve_stale.unwrap().mode, StaleMode::Immediate);
        // Zones that cover the block are fine; narrower ones are not representable.
        one("cluster.local:53 {\n cache 30 cluster.local .\n}");
        assert!(err("cluster.local:53 {\n cache 30 svc.cluster.local\n}")
            .contains("caching part of a block"));
    }

    #[test]
    fn cache_errors() {
        for (text, want) in [
            ("cache 0", "zero or negative"),
            ("cache -5", "zero or negative"),
            ("cache 3x", "neither a TTL"),
            ("cache {\n success\n}", "CAPACITY"),
            ("cache {\n success abc\n}", "capacity \"abc\""),
            ("cache {\n success 0\n}", "at least 1"),
            ("cache {\n denial 10 0\n}", "zero"),
            ("cache {\n prefetch 1 1m 5%\n}", "[10%, 90%]"),
            ("cache {\n prefetch 1 1m 50\n}", "'%'"),
            ("cache {\n serve_stale 1h later\n}", "immediate nor verify"),
            ("cache {\n servfail 10m\n}", "maximum"),
            ("cache {\n keepttl\n}", "not supported"),
            ("cache {\n bogus\n}", "unknown option"),
            ("cache\n cache", "given twice"),
        ] {
            let e = err(&format!(".:53 {{\n {text}\n}}"));
            assert!(e.starts_with("Corefile:"), "{e}");
            assert!(e.contains("cache: "), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn forward_forms() {
        let f =
            one(".:53 {\n forward . 1.1.1.1 8.8.8.8:5353 [2001:db8::1]:53 dns://9.9.9.9 ::1\n}")
                .forward
                .unwrap();
        let want: Vec<SocketAddr> = [
            "1.1.1.1:53",
            "8.8.8.8:5353",
            "[2001:db8::1]:53",
            "9.9.9.9:53",
            "[::1]:53",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(f.to, want);
        assert_eq!(f.from, ".");
        assert_eq!(f, Forward::new(".".to_owned(), want));
        let f = one(
            "a:53 {\n forward A.example 10.0.0.1 {\n  force_tcp\n  expire 1m30s\n  max_fails 0\n  health_check 250ms no_rec domain Probe.Example\n  policy sequential\n  max_concurrent 1000\n  except B.example c.example\n  read_timeout 1s\n  max_idle_conns 4\n }\n}",
        )
        .forward
        .unwrap();
        assert_eq!(f.from, "a.example.");
        assert!(f.force_tcp && !f.prefer_udp);
        assert_eq!(f.expire, Duration::from_secs(90));
        assert_eq!(f.max_fails, 0);
        assert_eq!(f.health_check, Duration::from_millis(250));
        assert!(f.health_check_no_rec);
        assert_eq!(f.health_check_domain, "probe.example.");
        assert_eq!(f.policy, config::Policy::Sequential);
        assert_eq!(f.max_concurrent, Some(1000));
        assert_eq!(f.except, vec!["b.example.", "c.example."]);
        assert_eq!(f.attempt_timeout, Duration::from_secs(1));
    }

    #[test]
    fn forward_errors() {
        let upstreams: Vec<String> = (1..=16).map(|i| format!("10.0.0.{i}")).collect();
        let too_many = format!("forward . {}", upstreams.join(" "));
        for (text, want) in [
            ("forward .", "want FROM TO"),
            (
                "forward . x.y",
                "\"x.y\" is not an upstream address (want IP[:port])",
            ),
            ("forward . tls://1.1.1.1", "tls://"),
            ("forward . 1.1.1.1:99999", "not an upstream address"),
            (too_many.as_str(), "at most 15"),
            (
                "forward . 1.1.1.1 {\n force_tcp\n prefer_udp\n}",
                "force_tcp and prefer_udp",
            ),
            ("forward . 1.1.1.1 {\n policy fastest\n}", "unknown policy"),
            ("forward . 1.1.1.1 {\n tls_servername x\n}", "not supported"),
            ("forward . 1.1.1.1 {\n expire 10\n}", "missing a unit"),
            ("forward . 1.1.1.1 {\n max_fails -1\n}", "not a number"),
            ("forward . 1.1.1.1 {\n force_tcp yes\n}", "no arguments"),
            ("forward . 1.1.1.1 {\n bogus\n}", "unknown option"),
        ] {
            let e = err(&format!(".:53 {{\n {text}\n}}"));
            assert!(e.starts_with("Corefile:"), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = err(".:53 {\n forward . 1.1.1.1 {\n force_tcp\n prefer_udp\n }\n}");
        assert_eq!(
            e,
            "Corefile:2: forward: force_tcp and prefer_udp can not both be set"
        );
        let e = err(".:53 {\n errors\n\n forward . x.y\n}");
        assert_eq!(
            e,
            "Corefile:4: forward: \"x.y\" is not an upstream address (want IP[:port])"
        );
    }

    #[test]
    fn forward_reads_a_resolv_conf() {
        let dir = std::env::temp_dir().join(format!("nld-corefile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            "# comment\nsearch example\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\noptions ndots:5\n",
        )
        .unwrap();
        std::fs::write(dir.join("empty.conf"), "search x\n").unwrap();
        let corefile = dir.join("Corefile");
        let config = parse(".:53 {\n forward . resolv.conf 10.0.0.1\n}", &corefile).unwrap();
        let to = &config.blocks[0].forward.as_ref().unwrap().to;
        let want: Vec<SocketAddr> = ["192.0.2.1:53", "[2001:db8::53]:53", "10.0.0.1:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(*to, want);
        let e = parse(".:53 {\n forward . empty.conf\n}", &corefile)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no nameservers"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prometheus_health_bind_reload() {
        let block = one(
            ".:53 {\n prometheus :9253\n health [fd00::1]:8080 {\n  lameduck 5s\n }\n bind 127.0.0.1 ::1 127.0.0.1\n bind 127.0.0.2\n reload 10s 2s\n loop\n errors {\n  consolidate 5m \".* timeout$\"\n }\n log . {\n  class error\n }\n}",
        );
        assert_eq!(block.prometheus, Some("0.0.0.0:9253".parse().unwrap()));
        assert_eq!(block.health, Some("[fd00::1]:8080".parse().unwrap()));
        let binds: Vec<IpAddr> = ["127.0.0.1", "::1", "127.0.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(block.bind, binds);
        assert_eq!(
            block.reload,
            Some(Reload {
                interval: Duration::from_secs(10),
                jitter: Duration::from_secs(2)
            })
        );
        assert!(block.loop_detect && block.errors && block.log);
        let block = one(".:53 {\n prometheus\n health\n reload\n}");
        assert_eq!(block.prometheus, Some(DEFAULT_PROMETHEUS_ADDR));
        assert_eq!(block.health, Some(DEFAULT_HEALTH_ADDR));
        assert_eq!(
            block.reload,
            Some(Reload {
                interval: DEFAULT_RELOAD_INTERVAL,
                jitter: DEFAULT_RELOAD_JITTER
            })
        );
        assert_eq!(
            one(".:53 {\n reload 2s 0\n}").reload.unwrap().jitter,
            Duration::ZERO
        );
        assert_eq!(
            one(".:53 {\n reload 10s\n}").reload.unwrap().jitter,
            Duration::from_secs(5)
        );
        let block = one(".:53 {\n prometheus localhost:9153\n reload 4s 10s\n}");
        assert_eq!(block.prometheus, Some(DEFAULT_PROMETHEUS_ADDR));
        assert_eq!(block.reload.unwrap().jitter, Duration::from_secs(2));
        let block = one(".:53 {\n}");
        assert!(block.cache.is_none() && block.forward.is_none() && !block.errors);
    }

    #[test]
    fn small_directive_errors() {
        for (text, want) in [
            ("bind eth0", "interface names are not supported"),
            ("bind", "at least one address"),
            ("bind 127.0.0.1 {\n}", "does not take a block"),
            ("prometheus 0.0.0.0", "not a listen address"),
            ("prometheus a b", "at most one"),
            ("health 1.2.3.4:x", "not a listen address"),
            ("health :8080 {\n lameduck\n}", "one duration"),
            ("reload 1s", "minimum"),
            ("reload 10s 500ms", "minimum"),
            ("reload 10", "missing a unit"),
            ("loop now", "no arguments"),
            ("errors {\n bogus\n}", "unknown option"),
            ("health\n health", "given twice"),
        ] {
            let e = err(&format!(".:53 {{\n {text}\n}}"));
            assert!(e.starts_with("Corefile:"), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_directives_are_errors() {
        assert_eq!(
            err(".:53 {\n errors\n cache 30\n rewrite name a b\n}"),
            "Corefile:4: unknown directive \"rewrite\" (node-local-dns supports errors, cache, reload, loop, bind, forward, prometheus, health, log, import, fastpath)"
        );
        let e = err(".:53 { errors; cache 30 }");
        assert!(e.contains("unknown directive \"errors;\""), "{e}");
        assert!(e.contains("';' does not separate directives"), "{e}");
    }

    #[test]
    fn fastpath_directive() {
        let fp = one(".:53 {\n fastpath tc veth1 eth0\n forward . 1.1.1.1\n}")
            .fast_path
            .unwrap();
        assert_eq!(fp.mode, ebpf::dns::Mode::Tc);
        assert_eq!(fp.interfaces, vec!["veth1", "eth0"]);
        let e = err(".:53 {\n fastpath xdp\n}");
        assert!(e.starts_with("Corefile:2: fastpath: want a mode"), "{e}");
        let e = err(".:53 {\n fastpath afxdp eth0\n}");
        assert!(
            e.starts_with("Corefile:2: fastpath: unknown fast path mode"),
            "{e}"
        );
    }

    #[test]
    fn brace_errors() {
        let e = err("cluster.local:53 {\n errors\n forward . 1.1.1.1 {\n force_tcp\n");
        assert!(e.starts_with("Corefile:3: forward: unclosed '{'"), "{e}");
        let e = err("cluster.local:53 {\n errors\n forward . 1.1.1.1 {\n force_tcp\n}\n");
        assert!(e.starts_with("Corefile:1: server block"), "{e}");
        let e = err("cluster.local:53 {\n errors\n");
        assert!(
            e.starts_with("Corefile:1: server block \"cluster.local:53\": unclosed '{'"),
            "{e}"
        );
        assert!(err("}").contains("unexpected '}'"));
        assert!(err(".:53").contains("expected '{'"));
        assert!(err("{\n}").contains("at least one key"));
        assert!(err(".:53 {\n errors\n {\n }\n}").contains("unexpected '{'"));
        let deep = format!(
            ".:53 {{\n log {}{}\n}}",
            "a {\n".repeat(20),
            "}\n".repeat(20)
        );
        assert!(err(&deep).contains("nested deeper"));
    }

    #[test]
    fn snippets() {
        let block =
            one("(common) {\n errors\n cache 30\n}\n.:53 {\n import common\n forward . 1.1.1.1\n}");
        assert!(block.errors);
        assert_eq!(
            block.cache.unwrap().success.max_ttl,
            Duration::from_secs(30)
        );
        let bomb = "(a) {\n log\n}\n".to_owned()
            + &(b'b'..=b'z')
                .map(|c| {
                    let prev = c - 1;
                    format!(
                        "({}) {{\n import {}\n import {}\n}}\n",
                        c as char, prev as char, prev as char
                    )
                })
                .collect::<String>()
            + ".:53 {\n import z\n}";
        assert!(err(&bomb).contains("more than"));
        let e = err("(a) {\n import a\n}\n.:53 {\n import a\n}");
        assert!(e.contains("import cycle"), "{e}");
        assert!(err(".:53 {\n import\n}").contains("want one file pattern"));
        assert!(err(".:53 {\n import nope.conf\n}").contains("does not exist"));
        // A glob that matches nothing is fine.
        one(".:53 {\n import nothing/*.override\n}");
    }

    #[test]
    fn go_durations() {
        for (text, ms) in [
            ("0", 0),
            ("500ms", 500),
            ("1m30s", 90_000),
            ("1.5h", 5_400_000),
            ("2s", 2000),
            ("1000us", 1),
            ("+3s", 3000),
            (".5s", 500),
        ] {
            assert_eq!(
                parse_go_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for text in [
            "",
            "10",
            "1x",
            "-1s",
            "s",
            "1..2s",
            "1s2",
            "99999999999999999999h",
        ] {
            assert!(parse_go_duration(text).is_err(), "{text}");
        }
    }

    #[test]
    fn glob_matching() {
        assert!(glob_match("*.override", "a.override"));
        assert!(glob_match("*.override", ".override"));
        assert!(!glob_match("*.override", "a.server"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("[^a-c]x", "bx"));
        assert!(glob_match("[^a-c]x", "dx"));
        assert!(glob_match("\\*", "*"));
        assert!(!glob_match("[", "["));
        assert!(glob_match(
            "**********b",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab"
        ));
        assert!(!glob_match(
            "*a*a*a*a*a*a*c",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab"
        ));
    }
}
