//! The query text, without IO: the simple LogQL subset an operator types (a stream selector
//! with `=`, `!=`, `=~`, `!~` matchers, then line filters `|=`, `!=`, `|~`, `!~`), its
//! translation to LogsQL for VictoriaLogs, and the shoot's `namespace_name` matcher added to
//! any LogQL query that starts with a selector.
//!
//! The translation keeps LogQL's meaning: a label matcher becomes an exact or regexp filter on
//! that field (`"namespace_name":="x"`, `NOT ...`, `"pod_name":~"^(?:re)$"`: LogQL's label
//! regexps are anchored, LogsQL's are not), `|= "foo"` the substring filter `*"foo"*` (LogQL
//! matches inside words; LogsQL's phrase filter `"foo"` would not), `|~ "re"` the regexp filter
//! `~"re"`, and the negations `NOT` of those. Field filters rather than a `{...}` stream filter,
//! so that labels which are not stream fields in the store (OTLP attributes) match as well.

use std::fmt::Write as _;

use thiserror::Error;

/// A label matcher's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `=~` (anchored regexp)
    Re,
    /// `!~`
    NotRe,
}

/// One label matcher of the stream selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    /// The label name.
    pub name: String,
    /// The operator.
    pub op: MatchOp,
    /// The value or regexp, unquoted.
    pub value: String,
}

/// A line filter's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineOp {
    /// `|=`: the line contains the text.
    Contains,
    /// `!=`: it does not.
    NotContains,
    /// `|~`: the line matches the regexp somewhere.
    Matches,
    /// `!~`: it does not.
    NotMatches,
}

/// One line filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineFilter {
    /// The operator.
    pub op: LineOp,
    /// The text or regexp, unquoted.
    pub text: String,
}

/// A query of the simple subset: `{matchers} filters...`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    /// The stream selector's matchers, in order.
    pub matchers: Vec<Matcher>,
    /// The line filters, in order.
    pub filters: Vec<LineFilter>,
}

/// Why a text is not a query of the subset (for VictoriaLogs it is then taken as LogsQL).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SelectorError {
    /// Something else than expected at a byte offset.
    #[error("at byte {at}: expected {expected}")]
    Expected {
        /// The byte offset.
        at: usize,
        /// What was expected.
        expected: &'static str,
    },
    /// A string literal with an escape LogQL does not have, or no closing quote.
    #[error("at byte {0}: bad string literal")]
    String(usize),
}

impl Selector {
    /// Parses `text` as the subset: `{name op "value", ...}` then `|= "text"`, `!= "text"`,
    /// `|~ "re"`, `!~ "re"` (double-quoted with Go escapes, or backquoted).
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let mut p = Parser { s: text, at: 0 };
        let mut selector = Selector::default();
        p.skip_space();
        p.expect("{", "`{`")?;
        p.skip_space();
        if !p.eat("}") {
            loop {
                p.skip_space();
                let name = p.label_name()?;
                p.skip_space();
                let op = if p.eat("=~") {
                    MatchOp::Re
                } else if p.eat("!~") {
                    MatchOp::NotRe
                } else if p.eat("!=") {
                    MatchOp::Ne
                } else if p.eat("=") {
                    MatchOp::Eq
                } else {
                    return Err(p.expected("`=`, `!=`, `=~` or `!~`"));
                };
                p.skip_space();
                let value = p.string()?;
                selector.matchers.push(Matcher { name, op, value });
                p.skip_space();
                if p.eat("}") {
                    break;
                }
                p.expect(",", "`,` or `}`")?;
            }
        }
        loop {
            p.skip_space();
            if p.at == p.s.len() {
                return Ok(selector);
            }
            let op = if p.eat("|=") {
                LineOp::Contains
            } else if p.eat("!=") {
                LineOp::NotContains
            } else if p.eat("|~") {
                LineOp::Matches
            } else if p.eat("!~") {
                LineOp::NotMatches
            } else {
                return Err(p.expected("a line filter `|=`, `!=`, `|~` or `!~`"));
            };
            p.skip_space();
            let text = p.string()?;
            selector.filters.push(LineFilter { op, text });
        }
    }

    /// The LogsQL query of the same meaning (`*` for an empty selector without filters).
    pub fn to_logsql(&self) -> String {
        let mut parts = Vec::new();
        for m in &self.matchers {
            let field = logsql_quote(&m.name);
            parts.push(match m.op {
                MatchOp::Eq => format!("{field}:={}", logsql_quote(&m.value)),
                MatchOp::Ne => format!("NOT {field}:={}", logsql_quote(&m.value)),
                MatchOp::Re => format!("{field}:~{}", logsql_quote(&anchored(&m.value))),
                MatchOp::NotRe => format!("NOT {field}:~{}", logsql_quote(&anchored(&m.value))),
            });
        }
        for f in &self.filters {
            // An empty text matches every line in LogQL: no filter.
            if f.text.is_empty() && matches!(f.op, LineOp::Contains | LineOp::Matches) {
                continue;
            }
            let text = logsql_quote(&f.text);
            parts.push(match f.op {
                LineOp::Contains => format!("*{text}*"),
                LineOp::NotContains if f.text.is_empty() => "NOT *".to_owned(),
                LineOp::NotContains => format!("NOT *{text}*"),
                LineOp::Matches => format!("~{text}"),
                LineOp::NotMatches => format!("NOT ~{text}"),
            });
        }
        if parts.is_empty() {
            "*".to_owned()
        } else {
            parts.join(" ")
        }
    }
}

/// A LogQL query with `name="value"` added to its leading stream selector (`{name="value"}`
/// for an empty query); `None` if the query does not start with `{`.
pub fn add_matcher(query: &str, name: &str, value: &str) -> Option<String> {
    let trimmed = query.trim_start();
    if trimmed.is_empty() {
        return Some(format!("{{{name}={}}}", logsql_quote(value)));
    }
    let rest = trimmed.strip_prefix('{')?;
    let inner = rest.trim_start();
    let sep = if inner.starts_with('}') { "" } else { ", " };
    Some(format!("{{{name}={}{sep}{inner}", logsql_quote(value)))
}

/// `^(?:re)$`: LogQL's label regexps match the whole value.
fn anchored(re: &str) -> String {
    format!("^(?:{re})$")
}

/// A double-quoted string literal that LogsQL and LogQL (Go's `strconv.Unquote`) read back as
/// `text`.
pub fn logsql_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Parser<'a> {
    s: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.s[self.at..]
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn expected(&self, expected: &'static str) -> SelectorError {
        SelectorError::Expected {
            at: self.at,
            expected,
        }
    }

    fn expect(&mut self, token: &str, expected: &'static str) -> Result<(), SelectorError> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(self.expected(expected))
        }
    }

    /// `[a-zA-Z_][a-zA-Z0-9_]*`
    fn label_name(&mut self) -> Result<String, SelectorError> {
        let rest = self.rest().as_bytes();
        let len = rest
            .iter()
            .enumerate()
            .take_while(|&(i, &b)| {
                b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
            })
            .count();
        if len == 0 {
            return Err(self.expected("a label name"));
        }
        let name = self.rest()[..len].to_owned();
        self.at += len;
        Ok(name)
    }

    /// A `"..."` literal with Go's escapes, or a backquoted raw string.
    fn string(&mut self) -> Result<String, SelectorError> {
        let start = self.at;
        let bad = SelectorError::String(start);
        if self.eat("`") {
            let end = self.rest().find('`').ok_or(bad)?;
            let text = self.rest()[..end].to_owned();
            self.at += end + 1;
            return Ok(text);
        }
        if !self.eat("\"") {
            return Err(self.expected("a string in double quotes or backquotes"));
        }
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.at += i + 1;
                    return Ok(out);
                }
                '\\' => {
                    let (_, e) = chars.next().ok_or(bad.clone())?;
                    match e {
                        '"' | '\\' | '\'' => out.push(e),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'a' => out.push('\u{7}'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'v' => out.push('\u{b}'),
                        'u' | 'U' => {
                            let n = if e == 'u' { 4 } else { 8 };
                            let mut code = 0u32;
                            for _ in 0..n {
                                let (_, h) = chars.next().ok_or(bad.clone())?;
                                code = code * 16 + h.to_digit(16).ok_or(bad.clone())?;
                            }
                            out.push(char::from_u32(code).ok_or(bad.clone())?);
                        }
                        _ => return Err(bad),
                    }
                }
                c => out.push(c),
            }
        }
        Err(bad)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn m(name: &str, op: MatchOp, value: &str) -> Matcher {
        Matcher {
            name: name.into(),
            op,
            value: value.into(),
        }
    }

    #[test]
    fn parses_the_subset() {
        let s = Selector::parse(
            r#" { namespace_name="shoot--p--n",pod_name!="a\"b", container_name=~`kube-.*`, x!~"y" } |= "foo" != "bar\n" |~ `err(or)?` !~ "debug" "#,
        )
        .unwrap();
        assert_eq!(
            s.matchers,
            vec![
                m("namespace_name", MatchOp::Eq, "shoot--p--n"),
                m("pod_name", MatchOp::Ne, "a\"b"),
                m("container_name", MatchOp::Re, "kube-.*"),
                m("x", MatchOp::NotRe, "y"),
            ]
        );
        let ops: Vec<(LineOp, &str)> = s.filters.iter().map(|f| (f.op, f.text.as_str())).collect();
        assert_eq!(
            ops,
            [
                (LineOp::Contains, "foo"),
                (LineOp::NotContains, "bar\n"),
                (LineOp::Matches, "err(or)?"),
                (LineOp::NotMatches, "debug"),
            ]
        );
        assert_eq!(Selector::parse("{}").unwrap(), Selector::default());
        assert_eq!(
            Selector::parse(r#"{a="\u00e9\U0001F600"}"#)
                .unwrap()
                .matchers[0]
                .value,
            "é😀"
        );
    }

    #[test]
    fn rejects_what_is_not_the_subset() {
        for (text, at) in [
            ("", 0),
            ("error", 0),
            (r#"{a="b"} "foo""#, 8),
            (r#"{a="b"} | json"#, 8),
            (r#"{a="b"} |= "foo" | line_format "x""#, 17),
            (r#"{a=b}"#, 3),
            (r#"{1a="b"}"#, 1),
            (r#"{a="b" c="d"}"#, 7),
            (r#"{a=="b"}"#, 3),
            ("count_over_time({a=\"b\"}[5m])", 0),
        ] {
            match Selector::parse(text) {
                Err(SelectorError::Expected { at: got, .. }) => assert_eq!(got, at, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        for text in [r#"{a="b}"#, r#"{a="\q"}"#, "{a=`b}", r#"{a="\u12"}"#] {
            assert!(
                matches!(Selector::parse(text), Err(SelectorError::String(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn translates_to_logsql() {
        let s = Selector::parse(
            r#"{namespace_name="shoot--p--n", pod_name!="etcd-0", container_name=~"kube-.*", x!~"a|b"} |= "foo \"q\"" != "bar" |~ "err|warn" !~ "debug""#,
        )
        .unwrap();
        assert_eq!(
            s.to_logsql(),
            r#""namespace_name":="shoot--p--n" NOT "pod_name":="etcd-0" "container_name":~"^(?:kube-.*)$" NOT "x":~"^(?:a|b)$" *"foo \"q\""* NOT *"bar"* ~"err|warn" NOT ~"debug""#
        );
        assert_eq!(Selector::parse("{}").unwrap().to_logsql(), "*");
        assert_eq!(
            Selector::parse(r#"{a="b"} |= "" |~ "" != """#)
                .unwrap()
                .to_logsql(),
            r#""a":="b" NOT *"#
        );
    }

    #[test]
    fn quotes_for_logsql() {
        assert_eq!(logsql_quote("a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\u0001""#);
        // What is quoted parses back.
        let text = "x\"\\\n\t\u{1}é";
        let s = Selector::parse(&format!("{{a={}}}", logsql_quote(text))).unwrap();
        assert_eq!(s.matchers[0].value, text);
    }

    #[test]
    fn adds_the_namespace() {
        let ns = "shoot--p--n";
        assert_eq!(
            add_matcher("", "namespace_name", ns).unwrap(),
            r#"{namespace_name="shoot--p--n"}"#
        );
        assert_eq!(
            add_matcher(r#" {pod_name="a"} |= "x""#, "namespace_name", ns).unwrap(),
            r#"{namespace_name="shoot--p--n", pod_name="a"} |= "x""#
        );
        assert_eq!(
            add_matcher("{ }", "namespace_name", ns).unwrap(),
            r#"{namespace_name="shoot--p--n"}"#
        );
        assert_eq!(
            add_matcher(r#"{a="b"} | json | level="error""#, "namespace_name", ns).unwrap(),
            r#"{namespace_name="shoot--p--n", a="b"} | json | level="error""#
        );
        assert_eq!(
            add_matcher("rate({a=\"b\"}[5m])", "namespace_name", ns),
            None
        );
    }
}
