//! The gateway's own HTTP/1.1 client codec for upstream connections: request heads
//! written straight from the outbound request, response heads parsed with `httparse`,
//! bodies framed by RFC 9112 section 6.
//!
//! It is what [`super::pool`] speaks on its connections instead of hyper's client: the
//! proxied path then needs no connection task, no channel between the request and its
//! connection and no second dispatcher, which is where the gateway spent its CPU
//! beside nginx's (see `bench/gateway-notes.md`). Everything here is pure (bytes in,
//! bytes out) and tested on its own, including every split of a message across reads.
//!
//! - A response head must fit in [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields.
//! - Interim (1xx) answers are skipped; `101 Switching Protocols` is an error (the
//!   gateway asked for no upgrade).
//! - Framing: no body for `HEAD`, 1xx, 204 and 304; chunked when `Transfer-Encoding`
//!   ends in `chunked`; else `Content-Length` (several values must agree); else the
//!   body runs to the connection's end. Anything but a clean length or chunked body
//!   closes the connection afterwards.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

use super::TryHead;

/// Largest response head accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// Most header fields accepted in a response head.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 << 10;
/// Most trailer bytes accepted after a chunked body (they are read and dropped).
const MAX_TRAILERS: usize = 64 << 10;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version and headers as sent, less the hop-by-hop ones (the fixed list
    /// and any the response's `Connection` names), which the client must not get.
    pub parts: http::response::Parts,
    /// How the body that follows is delimited.
    pub framing: Framing,
    /// Whether the connection may carry another request after this response's body.
    pub keep_alive: bool,
    /// With [`Fields::Raw`] asked for (and at most [`RAW_FIELDS`] end-to-end fields):
    /// the fields as the head's own lines, and `parts.headers` empty. Boxed: a
    /// response is moved several times on its way out, and inline it would be copied
    /// each time.
    pub raw: Option<Box<RawFields>>,
}

/// How a response head's end-to-end fields are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    /// In `parts.headers`, for anyone to read or change.
    Map,
    /// As [`RawFields`], for a caller that writes them to the client itself and reads
    /// none of them (a map would be built only to be written out again).
    Raw,
}

/// Most end-to-end fields kept as raw lines; a response with more gets a map.
pub const RAW_FIELDS: usize = 16;

/// An upstream response's end-to-end fields as lines of its head: everything but the
/// hop-by-hop fields and `Content-Length` (the client's framing is the writer's).
#[derive(Debug, Clone)]
pub struct RawFields {
    head: Bytes,
    /// Each field's line: where it starts, its name's length, where its value ends.
    lines: [(u32, u32, u32); RAW_FIELDS],
    count: usize,
}

impl RawFields {
    /// Adds a field's line: where it starts, its name's length, where its value ends
    /// (offsets in a head of at most [`MAX_HEAD`] bytes, which fit in `u32`). The
    /// caller made room: at most [`RAW_FIELDS`] fields come.
    fn push(&mut self, start: usize, name_len: usize, end: usize) {
        if let Some(line) = self.lines.get_mut(self.count) {
            *line = (start as u32, name_len as u32, end as u32);
            self.count += 1;
        }
    }

    /// Each field as (name, whole line without its CRLF), in the order sent.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .get(..self.count)
            .unwrap_or_default()
            .iter()
            .filter_map(|&(start, name_len, end)| {
                let (start, name_len, end) = (start as usize, name_len as usize, end as usize);
                Some((
                    self.head.get(start..start + name_len)?,
                    self.head.get(start..end)?,
                ))
            })
    }
}

/// Parses the response head at the start of `buf`, removing it (and any interim 1xx
/// answers before it) from `buf`. `Ok(None)`: the head is not complete yet.
#[cfg(test)]
pub fn parse_response(
    buf: &mut BytesMut,
    request_method: &Method,
) -> Result<Option<ResponseHead>, String> {
    parse_response_with(buf, request_method, &mut Vec::new(), Fields::Map)
}

/// Parses the response head at the start of `buf`, removing it (and any interim 1xx
/// answers before it) from `buf`. `Ok(None)`: the head is not complete yet. `spans` is
/// scratch the caller keeps (one per connection), so that no response pays for one.
/// `fields` says how the end-to-end fields are kept.
pub fn parse_response_with(
    buf: &mut BytesMut,
    request_method: &Method,
    spans: &mut Vec<(usize, usize, usize, usize)>,
    keep: Fields,
) -> Result<Option<ResponseHead>, String> {
    loop {
        // Left uninitialised for the parser to fill: zeroing 100 fields per response
        // costs more than parsing a small head.
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(format!("response head larger than {MAX_HEAD} bytes"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(format!("response head with more than {MAX_HEADERS} fields"));
            }
            Err(e) => return Err(format!("malformed response head: {e}")),
        };
        if len > MAX_HEAD {
            return Err(format!("response head larger than {MAX_HEAD} bytes"));
        }
        let code = res.code.unwrap_or(0);
        if code == 101 {
            return Err("the upstream switched protocols unasked".to_owned());
        }
        if (100..200).contains(&code) {
            buf.advance(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| format!("invalid response status {code}"))?;
        let version = if res.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Where each field's name and value sit in `buf`, so that the values can be
        // cut from the head's bytes without copying once the parser lets go of them.
        let base = buf.as_ptr() as usize;
        let count = res.headers.len();
        spans.clear();
        spans.extend(res.headers.iter().map(|field| {
            (
                field.name.as_ptr() as usize - base,
                field.name.len(),
                field.value.as_ptr() as usize - base,
                field.value.len(),
            )
        }));
        let head = buf.split_to(len).freeze();
        // One pass over the fields: the hop-by-hop ones are read (framing, keep-alive)
        // and left out of the map, so the client never gets them and nobody has to look
        // for them again; the rest go in, common names without `HeaderName`'s parser.
        // One spare slot: the gateway adds `x-request-id`.
        let mut raw = (keep == Fields::Raw && count <= RAW_FIELDS).then(|| {
            Box::new(RawFields {
                head: head.clone(),
                lines: [(0, 0, 0); RAW_FIELDS],
                count: 0,
            })
        });
        let mut headers = if raw.is_some() {
            HeaderMap::new()
        } else {
            HeaderMap::with_capacity(count + 1)
        };
        let mut wire = WireFields::default();
        for &(name_at, name_len, value_at, value_len) in spans.iter() {
            let (Some(name), Some(value)) = (
                head.get(name_at..name_at + name_len),
                head.get(value_at..value_at + value_len),
            ) else {
                return Err("invalid header field in response".to_owned());
            };
            // Only names of these lengths can be hop-by-hop or `Content-Length`; kept
            // as lines, the others need no look at all.
            let framing_or_hop = matches!(name.len(), 2 | 7 | 10 | 14 | 16..=19);
            if !framing_or_hop && let Some(raw) = &mut raw {
                raw.push(name_at, name_len, value_at + value_len);
                continue;
            }
            // Lower-cased once (every name the gateway looks for is short), then
            // compared exactly.
            let mut folded = [0_u8; 24];
            let lower = match folded.get_mut(..name.len()) {
                Some(lower) => {
                    lower.copy_from_slice(name);
                    lower.make_ascii_lowercase();
                    &*lower
                }
                None => &[],
            };
            if wire.take_hop_by_hop(lower, value) {
                continue;
            }
            if lower == b"content-length" {
                wire.content_length(value);
                if raw.is_some() {
                    continue;
                }
            }
            if let Some(raw) = &mut raw {
                raw.push(name_at, name_len, value_at + value_len);
                continue;
            }
            let name = known_name(lower)
                .or_else(|| HeaderName::from_bytes(name).ok())
                .ok_or_else(|| "invalid header name in response".to_owned())?;
            let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
                .map_err(|_| format!("invalid value of response header {name}"))?;
            headers.append(name, value);
        }
        // Fields the response's `Connection` names are hop-by-hop too (RFC 9110 7.6.1).
        for named in &wire.connection_named {
            headers.remove(named);
        }
        if let Some(raw) = &mut raw
            && !wire.connection_named.is_empty()
        {
            let mut kept = 0;
            for i in 0..raw.count {
                let Some(&line) = raw.lines.get(i) else { break };
                let (start, name_len, _) = line;
                let name = head
                    .get(start as usize..(start + name_len) as usize)
                    .unwrap_or_default();
                let named = wire
                    .connection_named
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n.as_str().as_bytes()));
                if !named && let Some(slot) = raw.lines.get_mut(kept) {
                    *slot = line;
                    kept += 1;
                }
            }
            raw.count = kept;
        }
        let (framing, framing_closes) = wire.framing(request_method, status)?;
        if wire.transfer_encoding {
            // The coding frames the body; a length beside it must not reach the client
            // (RFC 9112 6.3).
            headers.remove(CONTENT_LENGTH);
        }
        let keep_alive = !framing_closes && wire.keeps_alive(version);
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some(ResponseHead {
            parts,
            framing,
            keep_alive,
            raw,
        }));
    }
}

/// What a response head's hop-by-hop and length fields said, gathered in the one pass
/// over its fields.
#[derive(Debug, Default)]
struct WireFields {
    /// `Transfer-Encoding` was present.
    transfer_encoding: bool,
    /// Its last non-empty coding (across all its fields) is `chunked`.
    chunked: bool,
    /// `Content-Length`'s value (all its values agree), or the error they make.
    length: Option<Result<u64, String>>,
    /// `Connection` says `close`.
    close: bool,
    /// `Connection` says `keep-alive`.
    keep_alive: bool,
    /// Other fields `Connection` names, to be dropped too.
    connection_named: Vec<HeaderName>,
}

impl WireFields {
    /// Takes in a field if it is hop-by-hop (true: it stays out of the map). `name` is
    /// lower-cased.
    fn take_hop_by_hop(&mut self, name: &[u8], value: &[u8]) -> bool {
        let is = |n: &str| name == n.as_bytes();
        match name.len() {
            10 if is("connection") => {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        self.keep_alive = true;
                    } else if let Ok(named) = HeaderName::from_bytes(token) {
                        self.connection_named.push(named);
                    }
                }
                true
            }
            17 if is("transfer-encoding") => {
                self.transfer_encoding = true;
                if let Some(last) = value
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .rfind(|c| !c.is_empty())
                {
                    self.chunked = last.eq_ignore_ascii_case(b"chunked");
                }
                true
            }
            10 => is("keep-alive"),
            16 => is("proxy-connection"),
            18 => is("proxy-authenticate"),
            19 => is("proxy-authorization"),
            2 => is("te"),
            7 => is("trailer") || is("upgrade"),
            _ => false,
        }
    }

    /// Takes in a `Content-Length` value: digits, or a list of equal ones. A bad one
    /// is an error only where the length frames the body (see [`Self::framing`]).
    fn content_length(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
                .then(|| part.iter().fold(0_u64, |n, d| n * 10 + u64::from(d - b'0')));
            self.length = match (self.length.take(), n) {
                (Some(Err(e)), _) => Some(Err(e)),
                (_, None) => Some(Err(format!(
                    "invalid content-length in response: {:?}",
                    String::from_utf8_lossy(value)
                ))),
                (Some(Ok(l)), Some(n)) if l != n => Some(Err(
                    "conflicting content-length values in response".to_owned(),
                )),
                (_, Some(n)) => Some(Ok(n)),
            };
        }
    }

    /// RFC 9112 6.3. The flag: the connection must close after this body.
    fn framing(&self, method: &Method, status: StatusCode) -> Result<(Framing, bool), String> {
        if method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok((Framing::Empty, false));
        }
        if self.transfer_encoding {
            // A length beside a transfer coding is a smuggling sign: the coding wins and
            // the connection is not used again.
            let both = self.length.is_some();
            return Ok(if self.chunked {
                (Framing::Chunked, both)
            } else {
                (Framing::UntilClose, true)
            });
        }
        match &self.length {
            Some(Err(e)) => Err(e.clone()),
            Some(Ok(0)) => Ok((Framing::Empty, false)),
            Some(Ok(n)) => Ok((Framing::Length(*n), false)),
            None => Ok((Framing::UntilClose, true)),
        }
    }

    /// Whether `Connection` (and the version) allow another request on the connection.
    fn keeps_alive(&self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive && !self.close
        } else {
            !self.close
        }
    }
}

/// The header names messages carry most, matched (`name` lower-cased) without
/// `HeaderName`'s general parser.
fn known_name(name: &[u8]) -> Option<HeaderName> {
    use http::header;
    let is = |n: &HeaderName| name == n.as_str().as_bytes();
    let candidates: &[HeaderName] = match name.len() {
        4 => &[header::HOST, header::DATE, header::ETAG, header::VARY],
        6 => &[
            header::ACCEPT,
            header::SERVER,
            header::COOKIE,
            header::ORIGIN,
        ],
        7 => &[header::EXPIRES, header::REFERER],
        8 => &[header::LOCATION],
        10 => &[header::USER_AGENT, header::SET_COOKIE],
        12 => &[header::CONTENT_TYPE],
        13 => &[
            header::CACHE_CONTROL,
            header::LAST_MODIFIED,
            header::AUTHORIZATION,
        ],
        14 => &[header::CONTENT_LENGTH],
        15 => &[header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE],
        16 => &[header::CONTENT_ENCODING],
        _ => &[],
    };
    candidates.iter().find(|n| is(n)).cloned()
}

/// A field's name as a `HeaderName` (lower-cased): common names without the general
/// parser. `None`: not a valid name.
pub fn field_name(name: &[u8]) -> Option<HeaderName> {
    let mut folded = [0_u8; 24];
    if let Some(lower) = folded.get_mut(..name.len()) {
        lower.copy_from_slice(name);
        lower.make_ascii_lowercase();
        if let Some(known) = known_name(lower) {
            return Some(known);
        }
    }
    HeaderName::from_bytes(name).ok()
}

/// How a request's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no length header (a bodiless GET, HEAD, DELETE, ...).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl RequestFraming {
    /// The framing of a body of `len` bytes known in advance (`None`: unknown) sent
    /// with `method`: a zero length is written only for methods whose requests
    /// normally carry a body, as user agents do.
    pub fn for_body(method: &Method, len: Option<u64>) -> Self {
        match len {
            None => Self::Chunked,
            Some(0) if !expects_body(method) => Self::None,
            Some(n) => Self::Length(n),
        }
    }
}

fn expects_body(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// Appends the request head to `dst`: `method target HTTP/1.1`, the try's `Host` (in
/// place of the client's), the client's headers (which must hold no framing header of
/// their own), the gateway's added fields and the framing header.
pub fn encode_request_head(dst: &mut BytesMut, head: &TryHead<'_>, framing: RequestFraming) {
    dst.extend_from_slice(head.method.as_str().as_bytes());
    dst.extend_from_slice(b" ");
    dst.extend_from_slice(head.target.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    let mut field = |name: &[u8], value: &HeaderValue| {
        dst.extend_from_slice(name);
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    };
    if let Some(host) = head.host {
        field(b"host", host);
    }
    for (name, value) in head.headers {
        if head.host.is_some() && name == HOST {
            continue;
        }
        field(name.as_str().as_bytes(), value);
    }
    for (name, value) in head.added.fields() {
        field(name.as_bytes(), value);
    }
    if let Some(context) = &head.added.traceparent {
        dst.extend_from_slice(b"traceparent: ");
        dst.extend_from_slice(&super::traceparent_text(context));
        dst.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            dst.extend_from_slice(b"content-length: ");
            dst.extend_from_slice(itoa_u64(n).as_bytes());
            dst.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    dst.extend_from_slice(b"\r\n");
}

/// Appends one chunk of a chunked body (`data` must not be empty: an empty chunk ends
/// the body).
pub fn encode_chunk(dst: &mut BytesMut, data: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut size = [0_u8; 16];
    let mut n = data.len();
    let mut at = size.len();
    loop {
        at -= 1;
        if let Some(slot) = size.get_mut(at) {
            *slot = HEX[n & 0xf];
        }
        n >>= 4;
        if n == 0 || at == 0 {
            break;
        }
    }
    dst.extend_from_slice(size.get(at..).unwrap_or_default());
    dst.extend_from_slice(b"\r\n");
    dst.extend_from_slice(data);
    dst.extend_from_slice(b"\r\n");
}

/// The end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Decimal digits of `n` without `fmt`.
pub struct Digits {
    buf: [u8; 20],
    at: usize,
}

impl Digits {
    /// The digits.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(self.at..).unwrap_or_default()
    }
}

/// `n` in decimal.
pub fn itoa_u64(mut n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        at: 20,
    };
    loop {
        d.at -= 1;
        if let Some(slot) = d.buf.get_mut(d.at) {
            *slot = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || d.at == 0 {
            return d;
        }
    }
}

/// What [`Chunked::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The body (and its trailers) ended.
    End,
}

/// A chunked body's decoder: feed it the connection's buffer, take data out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines (this many bytes of them so far), up to
    /// the empty line.
    Trailers(usize),
    /// Done.
    Done,
}

impl Chunked {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self::Size
    }

    /// Takes what it can from `buf`: data, the end, or `Ok(None)` when `buf` holds too
    /// little to go on (read more, then call again).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, String> {
        loop {
            match *self {
                Self::Done => return Ok(Some(Decoded::End)),
                Self::Size => {
                    let Some(line_end) = find_crlf(buf, MAX_CHUNK_LINE)? else {
                        return Ok(None);
                    };
                    let line = buf.get(..line_end).unwrap_or_default();
                    let size = parse_chunk_size(line)?;
                    buf.advance(line_end + 2);
                    *self = if size == 0 {
                        Self::Trailers(0)
                    } else {
                        Self::Data(size)
                    };
                }
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    *self = if left == 0 {
                        Self::DataEnd
                    } else {
                        Self::Data(left)
                    };
                    return Ok(Some(Decoded::Data(data)));
                }
                Self::DataEnd => {
                    match buf.get(..2) {
                        None if buf.first().is_none_or(|&b| b == b'\r') => return Ok(None),
                        Some(b"\r\n") => buf.advance(2),
                        _ => return Err("chunk data not followed by CRLF".to_owned()),
                    }
                    *self = Self::Size;
                }
                Self::Trailers(seen) => {
                    let Some(line_end) = find_crlf(buf, MAX_TRAILERS.saturating_sub(seen))? else {
                        return Ok(None);
                    };
                    buf.advance(line_end + 2);
                    *self = if line_end == 0 {
                        Self::Done
                    } else {
                        Self::Trailers(seen + line_end + 2)
                    };
                }
            }
        }
    }
}

impl Default for Chunked {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the first CRLF in `buf` starts; an error when none is within `limit` bytes.
fn find_crlf(buf: &[u8], limit: usize) -> Result<Option<usize>, String> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) if at <= limit => Ok(Some(at)),
        Some(_) => Err("chunk line too long".to_owned()),
        None if buf.len() > limit => Err("chunk line too long".to_owned()),
        None => Ok(None),
    }
}

/// The hex size at the start of a chunk-size line (extensions after `;` ignored).
fn parse_chunk_size(line: &[u8]) -> Result<u64, String> {
    let digits = line
        .iter()
        .position(|&b| b == b';' || b == b' ' || b == b'\t')
        .map_or(line, |end| line.get(..end).unwrap_or_default());
    if digits.is_empty() || digits.len() > 15 {
        return Err("invalid chunk size".to_owned());
    }
    let mut size: u64 = 0;
    for &b in digits {
        let v = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return Err("invalid chunk size".to_owned()),
        };
        size = (size << 4) | u64::from(v);
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &[u8], method: &Method) -> Result<Option<ResponseHead>, String> {
        let mut buf = BytesMut::from(text);
        parse_response(&mut buf, method)
    }

    fn head(text: &str) -> ResponseHead {
        parse(text.as_bytes(), &Method::GET).unwrap().unwrap()
    }

    #[test]
    fn heads_parse_with_their_framing_and_keep_alive() {
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\nx-a: 2\r\n\r\nhi");
        assert_eq!(h.parts.status, StatusCode::OK);
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.keep_alive);
        assert_eq!(h.parts.headers.get_all("x-a").iter().count(), 2);

        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.keep_alive, "length beside a coding: not reused");
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);
        let h = head("HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);
        let h = head("HTTP/1.1 304 Not Modified\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);
        assert!(h.keep_alive);
        let h = parse(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: Close\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n");
        assert_eq!(h.parts.version, Version::HTTP_10);
        assert!(!h.keep_alive, "1.0 closes unless told otherwise");
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(3));
    }

    #[test]
    fn hop_by_hop_fields_stay_out_of_the_head_and_names_keep_their_case_folding() {
        let h = head(
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: today\r\nContent-Type: text/plain\r\n\
             Connection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\n\
             TE: trailers\r\nTrailer: x\r\nUpgrade: h2c\r\nProxy-Connection: close\r\n\
             Proxy-Authenticate: Basic\r\nX-Kept: yes\r\nCONTENT-LENGTH: 2\r\n\r\n",
        );
        let mut names: Vec<&str> = h.parts.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["content-length", "content-type", "date", "server", "x-kept"]
        );
        assert_eq!(h.parts.headers["content-type"], "text/plain");
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.keep_alive);

        // With a transfer coding the length is dropped (RFC 9112 6.3), and the coding
        // itself is the gateway's business, not the client's.
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n");
        assert!(h.parts.headers.is_empty(), "{:?}", h.parts.headers);
    }

    #[test]
    fn raw_fields_keep_the_end_to_end_lines_as_sent() {
        let text = "HTTP/1.1 200 OK\r\nServer: up\r\nSet-Cookie: a=1\r\n\
                    Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nSet-Cookie: b=2\r\n\
                    Keep-Alive: timeout=5\r\nContent-Length: 2\r\nX-Kept:  spaced \r\n\r\nok";
        let mut buf = BytesMut::from(text.as_bytes());
        let h = parse_response_with(&mut buf, &Method::GET, &mut Vec::new(), Fields::Raw)
            .unwrap()
            .unwrap();
        assert!(h.parts.headers.is_empty(), "{:?}", h.parts.headers);
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.keep_alive);
        assert_eq!(&buf[..], b"ok");
        let raw = h.raw.unwrap();
        let lines: Vec<(String, String)> = raw
            .lines()
            .map(|(n, l)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(l).into_owned(),
                )
            })
            .collect();
        let expect = [
            ("Server", "Server: up"),
            ("Set-Cookie", "Set-Cookie: a=1"),
            ("Set-Cookie", "Set-Cookie: b=2"),
            ("X-Kept", "X-Kept:  spaced"),
        ];
        assert_eq!(
            lines,
            expect.map(|(n, l)| (n.to_owned(), l.to_owned())).to_vec()
        );

        // More fields than the lines hold: a map, as without `Raw`.
        let many: String = (0..RAW_FIELDS + 1)
            .map(|i| format!("x-f{i}: {i}\r\n"))
            .collect();
        let mut buf = BytesMut::from(format!("HTTP/1.1 204 No Content\r\n{many}\r\n").as_bytes());
        let h = parse_response_with(&mut buf, &Method::GET, &mut Vec::new(), Fields::Raw)
            .unwrap()
            .unwrap();
        assert!(h.raw.is_none());
        assert_eq!(h.parts.headers.len(), RAW_FIELDS + 1);
    }

    #[test]
    fn a_bad_length_is_an_error_only_where_it_frames_the_body() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n"[..]);
        let err = parse_response(&mut buf, &Method::GET).unwrap_err();
        assert!(err.contains("invalid content-length"), "{err}");
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
        );
        let err = parse_response(&mut buf, &Method::GET).unwrap_err();
        assert!(err.contains("conflicting"), "{err}");
        let h = head("HTTP/1.1 204 No Content\r\ncontent-length: nope\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);
        let h =
            head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: nope\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.keep_alive);
    }

    #[test]
    fn interim_answers_are_skipped_and_the_head_removed_from_the_buffer() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"[..],
        );
        let h = parse_response(&mut buf, &Method::POST).unwrap().unwrap();
        assert_eq!(h.parts.status, StatusCode::CREATED);
        assert!(!h.parts.headers.contains_key("link"));
        assert_eq!(&buf[..], b"ok");
    }

    #[test]
    fn partial_heads_wait_and_bad_ones_are_errors() {
        assert!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-le", &Method::GET)
                .unwrap()
                .is_none()
        );
        assert!(parse(b"", &Method::GET).unwrap().is_none());
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
        ] {
            assert!(
                parse(bad, &Method::GET).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 1));
        assert!(parse(&huge, &Method::GET).is_err());
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(parse(&many, &Method::GET).is_err());
    }

    #[test]
    fn request_heads_carry_the_framing_they_are_given() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("client.example"));
        headers.append("x-b", HeaderValue::from_static("1"));
        headers.append("x-b", HeaderValue::from_static("2"));
        let host = HeaderValue::from_static("a:1");
        let added = super::super::Added {
            forwarded_for: Some(HeaderValue::from_static("10.0.0.1")),
            request_id: Some(HeaderValue::from_static("r1")),
            ..Default::default()
        };
        let none = super::super::Added::default();
        let empty = HeaderMap::new();
        let head = |method: &'static Method, target: &'static str| TryHead {
            method,
            target,
            host: None,
            headers: &empty,
            added: &none,
            fields: Fields::Map,
        };
        let mut out = BytesMut::new();
        let get = TryHead {
            method: &Method::GET,
            target: "/p?q=1",
            host: Some(&host),
            headers: &headers,
            added: &added,
            fields: Fields::Map,
        };
        encode_request_head(
            &mut out,
            &get,
            RequestFraming::for_body(&Method::GET, Some(0)),
        );
        assert_eq!(
            &out[..],
            &b"GET /p?q=1 HTTP/1.1\r\nhost: a:1\r\nx-b: 1\r\nx-b: 2\r\n\
               x-forwarded-for: 10.0.0.1\r\nx-request-id: r1\r\n\r\n"[..],
            "the try's host in place of the client's, the added fields last"
        );
        out.clear();
        encode_request_head(
            &mut out,
            &head(&Method::POST, "/"),
            RequestFraming::for_body(&Method::POST, Some(0)),
        );
        assert_eq!(&out[..], b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        out.clear();
        encode_request_head(
            &mut out,
            &head(&Method::PUT, "/"),
            RequestFraming::for_body(&Method::PUT, Some(1234567890123)),
        );
        assert_eq!(
            &out[..],
            b"PUT / HTTP/1.1\r\ncontent-length: 1234567890123\r\n\r\n"
        );
        out.clear();
        encode_request_head(
            &mut out,
            &head(&Method::POST, "/"),
            RequestFraming::for_body(&Method::POST, None),
        );
        assert_eq!(
            &out[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        out.clear();
        encode_chunk(&mut out, &[b'x'; 26]);
        encode_chunk(&mut out, b"y");
        out.extend_from_slice(LAST_CHUNK);
        let mut decoder = Chunked::new();
        let mut body = Vec::new();
        while let Some(Decoded::Data(d)) = decoder.decode(&mut out).unwrap() {
            body.extend_from_slice(&d);
        }
        assert_eq!(body.len(), 27);
        assert_eq!(decoder, Chunked::Done);
    }

    /// Decodes `wire` fed in pieces cut at `cuts`; the body, or the error.
    fn decode_in_pieces(wire: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, Vec<u8>), String> {
        let mut decoder = Chunked::new();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut fed = 0;
        for point in points {
            buf.extend_from_slice(&wire[fed..point]);
            fed = point;
            loop {
                match decoder.decode(&mut buf)? {
                    Some(Decoded::Data(d)) => body.extend_from_slice(&d),
                    Some(Decoded::End) => {
                        let mut after = buf.to_vec();
                        after.extend_from_slice(&wire[fed..]);
                        return Ok((body, after));
                    }
                    None => break,
                }
            }
        }
        Err("incomplete".to_owned())
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let wire = b"4;name=v\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-sum: 1\r\n\r\nNEXT";
        let (body, rest) = decode_in_pieces(wire, &[]).unwrap();
        assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(rest, b"NEXT", "what follows the body stays in the buffer");
        for bad in [
            &b"zz\r\n"[..],
            b"4\r\nWikiXX",
            b"\r\n",
            b"1234567890abcdef0\r\n",
        ] {
            assert!(decode_in_pieces(bad, &[]).is_err(), "{bad:?}");
        }
        let mut long = vec![b'1'];
        long.extend(std::iter::repeat_n(b' ', MAX_CHUNK_LINE + 1));
        assert!(decode_in_pieces(&long, &[]).is_err());
    }

    proptest! {
        /// Any body, cut into any chunks and fed in any pieces, decodes to itself
        /// and leaves what follows it in the buffer.
        #[test]
        fn chunked_round_trips_across_any_reads(
            body in proptest::collection::vec(any::<u8>(), 0..2000),
            chunk_sizes in proptest::collection::vec(1_usize..300, 1..20),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut wire = BytesMut::new();
            let mut rest = &body[..];
            let mut sizes = chunk_sizes.iter().cycle();
            while !rest.is_empty() {
                let n = (*sizes.next().unwrap()).min(rest.len());
                encode_chunk(&mut wire, &rest[..n]);
                rest = &rest[n..];
            }
            wire.extend_from_slice(LAST_CHUNK);
            wire.extend_from_slice(b"HTTP/1.1");
            let (decoded, after) = decode_in_pieces(&wire, &cuts).unwrap();
            prop_assert_eq!(decoded, body);
            prop_assert_eq!(after, b"HTTP/1.1".to_vec());
        }

        /// A response head split anywhere parses once complete, to the same thing.
        #[test]
        fn heads_parse_the_same_across_any_split(cut in 0_usize..80) {
            let wire = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
            let cut = cut.min(wire.len());
            let mut buf = BytesMut::from(&wire[..cut]);
            let first = parse_response(&mut buf, &Method::GET).unwrap();
            buf.extend_from_slice(&wire[cut..]);
            let head = match first {
                Some(h) => h,
                None => parse_response(&mut buf, &Method::GET).unwrap().unwrap(),
            };
            prop_assert_eq!(head.framing, Framing::Length(2));
            prop_assert_eq!(&head.parts.headers["content-type"], "application/json");
            prop_assert_eq!(&buf[..], b"{}");
        }

        /// Arbitrary bytes never panic the parsers.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = parse_response(&mut buf, &Method::GET);
            let mut buf = BytesMut::from(&bytes[..]);
            let mut decoder = Chunked::new();
            for _ in 0..64 {
                match decoder.decode(&mut buf) {
                    Ok(Some(Decoded::Data(_))) => {}
                    _ => break,
                }
            }
        }
    }
}
