//! The first pass: Corefile text to tokens with their file and line, as CoreDNS (Caddy v1)
//! splits them, with `{$VAR}` / `{%VAR%}` replaced from the environment.

use std::path::PathBuf;
use std::rc::Rc;

use super::CorefileError;
use crate::config::Location;

/// One token with where it was written.
#[derive(Debug, Clone)]
pub(super) struct Token {
    pub(super) text: String,
    pub(super) line: usize,
    pub(super) file: Rc<PathBuf>,
    /// Written in quotes: never a brace, a comment or a keyword.
    pub(super) quoted: bool,
}

impl Token {
    pub(super) fn location(&self) -> Location {
        Location {
            file: (*self.file).clone(),
            line: self.line,
        }
    }

    pub(super) fn is(&self, text: &str) -> bool {
        !self.quoted && self.text == text
    }

    pub(super) fn same_line(&self, other: &Token) -> bool {
        self.line == other.line && Rc::ptr_eq(&self.file, &other.file)
    }
}

pub(super) fn lex(
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::net::IpAddr;
    use std::path::Path;

    use crate::corefile::parse_with_env;
    use crate::corefile::test_util::*;

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
}
