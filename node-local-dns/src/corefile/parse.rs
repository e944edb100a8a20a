//! The third pass: tokens to server blocks (`[dns://]zone[:port]` keys, then directive lines
//! with their arguments and nested blocks), each directive handed to its interpreter in
//! `plugins`; and the check that two blocks do not serve the same zone on the same address.

use std::path::PathBuf;
use std::rc::Rc;

use super::lex::Token;
use super::plugins::apply_directive;
use super::CorefileError;
use crate::config::{Location, ServerBlock, DEFAULT_PORT};

/// `{` nesting deeper than this is refused (no supported plugin needs more than 2).
pub const MAX_BLOCK_DEPTH: usize = 8;

pub(super) struct Cursor<'t> {
    pub(super) tokens: &'t [Token],
    pub(super) pos: usize,
    pub(super) file: &'t Rc<PathBuf>,
}

impl<'t> Cursor<'t> {
    pub(super) fn peek(&self) -> Option<&'t Token> {
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
pub(super) struct Item<'t> {
    /// The directive whose block this line is in (None: a directive of a server block).
    parent: Option<&'t Token>,
    pub(super) name: &'t Token,
    pub(super) args: Vec<&'t Token>,
    block: Option<Vec<Item<'t>>>,
}

impl Item<'_> {
    pub(super) fn arg_texts(&self) -> Vec<&str> {
        self.args.iter().map(|t| t.text.as_str()).collect()
    }

    /// An error at this line, named after the directive (`cache: success: …` for an option).
    pub(super) fn error(&self, message: impl Into<String>) -> CorefileError {
        match self.parent {
            None => directive_error(self.name, &self.name.text, message.into()),
            Some(parent) => directive_error(
                self.name,
                &parent.text,
                format!("{}: {}", self.name.text, message.into()),
            ),
        }
    }

    pub(super) fn no_block(&self) -> Result<(), CorefileError> {
        match &self.block {
            Some(_) => Err(self.error("does not take a block")),
            None => Ok(()),
        }
    }

    pub(super) fn block_items(&self) -> &[Item<'_>] {
        self.block.as_deref().unwrap_or(&[])
    }
}

pub(super) fn directive_error(at: &Token, directive: &str, message: String) -> CorefileError {
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

pub(super) fn parse_server_block(cursor: &mut Cursor<'_>) -> Result<ServerBlock, CorefileError> {
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
pub(super) fn normalize_zone(zone: &str) -> Result<String, String> {
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
pub(super) fn zone_within(zone: &str, parent: &str) -> bool {
    parent == "." || zone == parent || zone.ends_with(&format!(".{parent}"))
}

/// Two blocks may not serve the same zone on the same port and address (CoreDNS refuses it).
pub(super) fn check_overlap(
    existing: &[ServerBlock],
    block: &ServerBlock,
) -> Result<(), CorefileError> {
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

    use crate::corefile::test_util::*;

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
}
