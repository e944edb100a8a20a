//! The second pass: `import` of snippets and of files by glob, replaced by the tokens they
//! name, with the depth, size and cycle checks; and the glob engine (Go's `filepath.Glob`).

use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::lex::{lex, Token};
use super::parse::directive_error;
use super::{canonical, read, CorefileError};

/// `import` nesting deeper than this is refused (a cycle is reported before that).
pub const MAX_IMPORT_DEPTH: usize = 32;
/// A Corefile whose imports expand to more tokens than this is refused (snippets importing
/// snippets twice each grow exponentially).
pub const MAX_EXPANDED_TOKENS: usize = 50_000;

pub(super) struct Expander<'e> {
    pub(super) env: &'e dyn Fn(&str) -> Option<String>,
    /// `(name) { … }` definitions seen so far, with their body tokens.
    pub(super) snippets: Vec<(String, Vec<Token>)>,
    /// Files and snippets being imported, outermost first (canonical paths; snippets as
    /// `(name)`).
    pub(super) stack: Vec<String>,
}

impl Expander<'_> {
    pub(super) fn expand(
        &mut self,
        tokens: Vec<Token>,
        depth: usize,
    ) -> Result<Vec<Token>, CorefileError> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;

    use crate::corefile::test_util::*;

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
