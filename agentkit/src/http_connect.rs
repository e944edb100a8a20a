//! Incremental parser for the head of an HTTP/1.x CONNECT request (RFC 9110 §9.3.6, message
//! syntax per RFC 9112): the authority-form request-target and the `X-Gardener-Destination`
//! header that selects the route.
//!
//! [`parse`] takes the bytes received so far; lines are checked as soon as they are complete
//! and control bytes as soon as they arrive, so binary junk (a TLS ClientHello) is rejected
//! after one byte. Everything after the head is tunnel payload and is left to the caller.

use std::net::Ipv6Addr;

use thiserror::Error;

/// Largest request head accepted (request line + headers + CRLFCRLF).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

const DESTINATION_HEADER: &[u8] = b"x-gardener-destination";

/// A complete CONNECT request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// the request-target (authority form host:port), as sent
    pub authority: String,
    /// the value of the X-Gardener-Destination header (name case-insensitive, value trimmed), if present
    pub destination: Option<String>,
    /// length of the request head including the final CRLFCRLF; bytes after it are payload
    pub head_len: usize,
}

/// Why a request head cannot be served; [`ConnectError::status`] is the HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ConnectError {
    /// A valid-looking request with a method other than CONNECT (405).
    #[error("method is not CONNECT")]
    NotConnect,
    /// A bad request line or header, a target that is not authority-form, an HTTP version
    /// other than 1.0/1.1, or a duplicate X-Gardener-Destination (400).
    #[error("malformed CONNECT request: {0}")]
    Malformed(&'static str),
    /// No end of the head within [`MAX_REQUEST_HEAD`] bytes (431).
    #[error("request head larger than 8 KiB")]
    TooLarge,
}

impl ConnectError {
    /// Bounded metric label: "not_connect" | "malformed" | "too_large".
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::NotConnect => "not_connect",
            ConnectError::Malformed(_) => "malformed",
            ConnectError::TooLarge => "too_large",
        }
    }

    /// The HTTP status code to answer with: 405, 400 or 431.
    pub fn status(&self) -> u16 {
        match self {
            ConnectError::NotConnect => 405,
            ConnectError::Malformed(_) => 400,
            ConnectError::TooLarge => 431,
        }
    }
}

/// Parses the CONNECT request head at the start of `buf`.
///
/// `Ok(None)`: need more bytes. Lines end with CRLF; a bare LF is tolerated, a CR not followed
/// by LF is `Malformed`. Empty lines before the request line are skipped (RFC 9112 §2.2).
/// Control bytes other than HTAB are `Malformed` wherever they appear; obsolete line folding
/// and whitespace between a header name and its colon are `Malformed` (RFC 9112 §5).
/// A method other than `CONNECT` (methods are case-sensitive) is `NotConnect` once the whole
/// head has been read and found well-formed. The `Host` header is not checked.
///
/// Once a prefix of the stream yields a result (value or error), every longer prefix yields
/// the same one.
pub fn parse(buf: &[u8]) -> Result<Option<ConnectRequest>, ConnectError> {
    let scanned = buf.get(..MAX_REQUEST_HEAD).unwrap_or(buf);
    let mut line_start = 0usize;
    let mut request_line: Option<RequestLine<'_>> = None;
    let mut destination: Option<&[u8]> = None;
    for (i, &b) in scanned.iter().enumerate() {
        match b {
            b'\n' => {
                let raw = scanned.get(line_start..i).unwrap_or_default();
                let line = raw.strip_suffix(b"\r").unwrap_or(raw);
                line_start = i + 1;
                match &request_line {
                    // Empty lines before the request line are ignored.
                    None if line.is_empty() => {}
                    None => request_line = Some(parse_request_line(line)?),
                    Some(request) if line.is_empty() => {
                        return finish(request, destination, line_start).map(Some)
                    }
                    Some(_) => parse_header(line, &mut destination)?,
                }
            }
            b'\r' => match scanned.get(i + 1) {
                Some(b'\n') | None => {}
                Some(_) => return Err(ConnectError::Malformed("CR not followed by LF")),
            },
            b'\t' => {}
            0x00..=0x1f | 0x7f => {
                return Err(ConnectError::Malformed("control byte in the request head"))
            }
            _ => {}
        }
    }
    if buf.len() >= MAX_REQUEST_HEAD {
        Err(ConnectError::TooLarge)
    } else {
        Ok(None)
    }
}

#[derive(Debug, Clone, Copy)]
struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
}

/// `method SP request-target SP HTTP-version` (RFC 9112 §3).
fn parse_request_line(line: &[u8]) -> Result<RequestLine<'_>, ConnectError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ConnectError::Malformed("request line"));
    };
    if !is_token(method) {
        return Err(ConnectError::Malformed("method"));
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err(ConnectError::Malformed("request-target"));
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(ConnectError::Malformed("HTTP version is not 1.0 or 1.1"));
    }
    if method == b"CONNECT" && !is_authority_form(target) {
        return Err(ConnectError::Malformed(
            "CONNECT request-target is not host:port",
        ));
    }
    Ok(RequestLine { method, target })
}

/// `field-name ":" OWS field-value OWS` (RFC 9112 §5); records X-Gardener-Destination.
fn parse_header<'a>(
    line: &'a [u8],
    destination: &mut Option<&'a [u8]>,
) -> Result<(), ConnectError> {
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err(ConnectError::Malformed("obsolete line folding"));
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(ConnectError::Malformed("header line without a colon"));
    };
    let (name, value) = line.split_at(colon);
    if !is_token(name) {
        return Err(ConnectError::Malformed("header name"));
    }
    if name.eq_ignore_ascii_case(DESTINATION_HEADER) {
        if destination.is_some() {
            return Err(ConnectError::Malformed("duplicate X-Gardener-Destination"));
        }
        let value = trim_ows(value.get(1..).unwrap_or_default());
        if value.is_empty() {
            return Err(ConnectError::Malformed("empty X-Gardener-Destination"));
        }
        if !value.is_ascii() {
            return Err(ConnectError::Malformed(
                "X-Gardener-Destination is not ASCII",
            ));
        }
        *destination = Some(value);
    }
    Ok(())
}

fn finish(
    request: &RequestLine<'_>,
    destination: Option<&[u8]>,
    head_len: usize,
) -> Result<ConnectRequest, ConnectError> {
    if request.method != b"CONNECT" {
        return Err(ConnectError::NotConnect);
    }
    // Both were checked to be ASCII.
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    Ok(ConnectRequest {
        authority: text(request.target),
        destination: destination.map(text),
        head_len,
    })
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// `token = 1*tchar` (RFC 9110 §5.6.2).
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// `authority-form = uri-host ":" port` (RFC 9112 §3.2.3), with a port in 1..=65535 and a host
/// that is an IP-literal (IPv6 only) or a reg-name / IPv4 address (RFC 3986 §3.2.2).
fn is_authority_form(target: &[u8]) -> bool {
    let Some(colon) = target.iter().rposition(|&b| b == b':') else {
        return false;
    };
    let (host, port) = (&target[..colon], &target[colon + 1..]);
    if port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let port = port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    if port == 0 || port > u32::from(u16::MAX) {
        return false;
    }
    if let Some(literal) = host.strip_prefix(b"[") {
        return literal
            .strip_suffix(b"]")
            .and_then(|ip| std::str::from_utf8(ip).ok())
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok());
    }
    is_reg_name(host)
}

/// `reg-name = *( unreserved / pct-encoded / sub-delims )`, non-empty here.
fn is_reg_name(host: &[u8]) -> bool {
    if host.is_empty() {
        return false;
    }
    let mut i = 0;
    while let Some(&b) = host.get(i) {
        if b == b'%' {
            match host.get(i + 1..i + 3) {
                Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => i += 3,
                _ => return false,
            }
            continue;
        }
        let ok = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        if !ok {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DESTINATION: &str = "outbound|443||kube-apiserver.shoot--dev--s1.svc.cluster.local";

    fn request(target: &str, headers: &[&str]) -> Vec<u8> {
        let mut head = format!("CONNECT {target} HTTP/1.1\r\n");
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    fn malformed(input: &[u8]) -> bool {
        matches!(parse(input), Err(ConnectError::Malformed(_)))
    }

    /// Every strict prefix is `Ok(None)`; the whole input gives the request, returned.
    fn assert_every_split(input: &[u8]) -> ConnectRequest {
        for cut in 0..input.len() {
            assert_eq!(parse(&input[..cut]), Ok(None), "prefix of {cut} bytes");
        }
        parse(input).unwrap().unwrap()
    }

    /// Once a prefix is decided, every longer prefix gives the same answer.
    fn assert_prefix_consistent(input: &[u8]) {
        let whole = parse(input);
        for cut in 0..input.len() {
            match parse(&input[..cut]) {
                Ok(None) => {}
                decided => assert_eq!(decided, whole, "prefix of {cut} bytes"),
            }
        }
    }

    #[test]
    fn connect_with_payload_after_the_head() {
        let head = request(
            "api.s1.test:443",
            &[
                "Host: api.s1.test:443",
                &format!("X-Gardener-Destination: \t {DESTINATION} \t"),
                "User-Agent: test",
            ],
        );
        let mut input = head.clone();
        input.extend_from_slice(b"\x16\x03\x01\x02\x00 tunnel bytes\r\n\r\n");
        let req = parse(&input).unwrap().unwrap();
        assert_eq!(
            req,
            ConnectRequest {
                authority: "api.s1.test:443".into(),
                destination: Some(DESTINATION.into()),
                head_len: head.len(),
            }
        );
        assert_eq!(assert_every_split(&head), req);
    }

    #[test]
    fn header_name_is_case_insensitive() {
        for name in [
            "x-gardener-destination",
            "X-GARDENER-DESTINATION",
            "x-Gardener-DESTination",
        ] {
            let input = request("10.0.0.1:443", &[&format!("{name}:{DESTINATION}")]);
            let req = parse(&input).unwrap().unwrap();
            assert_eq!(req.destination.as_deref(), Some(DESTINATION));
        }
    }

    #[test]
    fn missing_destination() {
        let input = request("api.s1.test:443", &["Host: api.s1.test:443"]);
        let req = assert_every_split(&input);
        assert_eq!(req.destination, None);
        assert_eq!(req.head_len, input.len());
        let bare = b"CONNECT a:1 HTTP/1.0\r\n\r\n";
        assert_eq!(parse(bare).unwrap().unwrap().head_len, bare.len());
    }

    #[test]
    fn bare_lf_and_leading_empty_lines() {
        let input = format!(
            "\r\n\nCONNECT a.b:8443 HTTP/1.1\nX-Gardener-Destination: {DESTINATION}\n\nrest"
        );
        let req = parse(input.as_bytes()).unwrap().unwrap();
        assert_eq!(req.authority, "a.b:8443");
        assert_eq!(req.destination.as_deref(), Some(DESTINATION));
        assert_eq!(req.head_len, input.len() - 4);
        assert_every_split(&input.as_bytes()[..req.head_len]);
    }

    #[test]
    fn authority_forms() {
        for target in [
            "[2001:db8::1]:443",
            "[::1]:1",
            "10.0.0.1:65535",
            "api.s1.test:443",
            "under_score.example:443",
            "pct%41.example:443",
        ] {
            let req = parse(&request(target, &[])).unwrap().unwrap();
            assert_eq!(req.authority, target);
        }
        for target in [
            "api.s1.test",
            "api.s1.test:",
            ":443",
            "api.s1.test:0",
            "api.s1.test:65536",
            "api.s1.test:4a3",
            "/index.html",
            "http://api.s1.test:443/",
            "user@api.s1.test:443",
            "[::1:443",
            "[not-ip]:443",
            "::1:443",
            "a/b:443",
            "pct%4.example:443",
        ] {
            assert!(malformed(&request(target, &[])), "{target}");
        }
    }

    #[test]
    fn other_methods() {
        for input in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"POST /x HTTP/1.0\r\n\r\n",
            b"connect a:443 HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET http://a.example/ HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse(input), Err(ConnectError::NotConnect));
            assert_prefix_consistent(input);
        }
        // Decided only once the head is complete.
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert!(malformed(b"GET / HTTP/1.1\r\nbad header\r\n\r\n"));
    }

    #[test]
    fn garbage_is_rejected_early() {
        assert!(malformed(&[0x16]));
        assert!(malformed(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]));
        assert!(malformed(b"\0"));
        assert!(malformed(b"CONNECT a:1\x7f"));
        assert!(malformed(b"CON\rNECT"));
        assert_eq!(parse(b""), Ok(None));
        assert_eq!(parse(b"\r"), Ok(None));
        assert_eq!(
            parse(b"PRI * HTTP/2.0\r\n"),
            Err(ConnectError::Malformed("HTTP version is not 1.0 or 1.1"))
        );
    }

    #[test]
    fn malformed_heads() {
        for input in [
            &b"CONNECT a:443 HTTP/2.0\r\n\r\n"[..],
            b"CONNECT a:443 HTTP/1.1 extra\r\n\r\n",
            b"CONNECT  a:443 HTTP/1.1\r\n\r\n",
            b"CONNECT a:443\r\n\r\n",
            b"CONNECT a:443 http/1.1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1 \r\n\r\n",
            b"CONN(ECT a:443 HTTP/1.1\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nno colon\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nX-Foo : bar\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n: bar\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nX-Foo: bar\r\n folded\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nX-Foo: b\x01ar\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nX-Foo: bar\r\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nX-Gardener-Destination:  \r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nX-Gardener-Destination: caf\xc3\xa9\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nX-Gardener-Destination: a\r\nx-gardener-destination: a\r\n\r\n",
            b"CONNECT caf\xc3\xa9:443 HTTP/1.1\r\n\r\n",
        ] {
            assert!(malformed(input), "{:?}: {:?}", String::from_utf8_lossy(input), parse(input));
            assert_prefix_consistent(input);
        }
        // obs-text is fine in other header values.
        assert!(
            parse(b"CONNECT a:443 HTTP/1.1\r\nX-Foo: caf\xc3\xa9\r\n\r\n")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn duplicate_destination_decided_at_its_line() {
        let input =
            b"CONNECT a:443 HTTP/1.1\r\nX-Gardener-Destination: a\r\nX-Gardener-Destination: b\r\n";
        assert!(malformed(input));
        assert_eq!(parse(&input[..input.len() - 1]), Ok(None));
    }

    #[test]
    fn too_large() {
        let mut input = b"CONNECT a:443 HTTP/1.1\r\n".to_vec();
        while input.len() < MAX_REQUEST_HEAD + 100 {
            input.extend_from_slice(
                b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        assert_eq!(parse(&input[..MAX_REQUEST_HEAD - 1]), Ok(None));
        assert_eq!(
            parse(&input[..MAX_REQUEST_HEAD]),
            Err(ConnectError::TooLarge)
        );
        assert_eq!(parse(&input), Err(ConnectError::TooLarge));
        let mut complete = input.clone();
        complete.extend_from_slice(b"\r\n");
        assert_eq!(parse(&complete), Err(ConnectError::TooLarge));
    }

    #[test]
    fn head_of_exactly_the_maximum() {
        let mut head = b"CONNECT a:443 HTTP/1.1\r\nX-Padding: ".to_vec();
        head.resize(MAX_REQUEST_HEAD - 4, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse(&head).unwrap().unwrap().head_len, MAX_REQUEST_HEAD);
        // One byte more and the final LF falls outside the cap.
        let mut over = b"CONNECT a:443 HTTP/1.1\r\nX-Padding: ".to_vec();
        over.resize(MAX_REQUEST_HEAD - 3, b'a');
        over.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse(&over), Err(ConnectError::TooLarge));
    }

    #[test]
    fn statuses_and_kinds() {
        assert_eq!(ConnectError::NotConnect.status(), 405);
        assert_eq!(ConnectError::Malformed("x").status(), 400);
        assert_eq!(ConnectError::TooLarge.status(), 431);
        assert_eq!(ConnectError::NotConnect.kind(), "not_connect");
        assert_eq!(ConnectError::Malformed("x").kind(), "malformed");
        assert_eq!(ConnectError::TooLarge.kind(), "too_large");
    }

    fn header_line() -> impl Strategy<Value = String> {
        ("[A-Za-z0-9-]{1,16}", "[ -~]{0,40}").prop_map(|(n, v)| format!("{n}: {v}"))
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn random_text_never_panics_and_is_prefix_consistent(
            text in "(CONNECT |GET )?[ -~\r\n\t]{0,200}",
        ) {
            let _ = parse(text.as_bytes());
            assert_prefix_consistent(text.as_bytes());
        }

        #[test]
        fn random_valid_requests_round_trip(
            host in "[a-z0-9-]{1,20}(\\.[a-z0-9-]{1,20}){0,3}",
            port in 1u16..,
            destination in proptest::option::of("[!-~]([ -~]{0,60}[!-~])?"),
            extra in proptest::collection::vec(header_line(), 0..6)
                .prop_filter("no destination header", |h| {
                    h.iter().all(|l| !l.to_ascii_lowercase().starts_with("x-gardener-destination:"))
                }),
            at in any::<prop::sample::Index>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut headers = extra;
            if let Some(d) = &destination {
                headers.insert(at.index(headers.len() + 1), format!("X-Gardener-Destination: {d}"));
            }
            let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
            let authority = format!("{host}:{port}");
            let head = request(&authority, &refs);
            let mut input = head.clone();
            input.extend_from_slice(&payload);
            let req = parse(&input).unwrap().unwrap();
            prop_assert_eq!(req.authority, authority);
            prop_assert_eq!(req.destination, destination);
            prop_assert_eq!(req.head_len, head.len());
            prop_assert_eq!(parse(&head[..head.len() - 1]), Ok(None));
        }
    }
}
