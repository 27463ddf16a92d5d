//! A minimal HTTP/1.1 client for the admin subcommands and tests (one request per connection,
//! `Content-Length` bodies: exactly what the admin API speaks).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest response accepted.
const MAX_RESPONSE: usize = 16 << 20;

/// One admin request: `Request::new(addr, "POST", "/topics").json(Some(body)).token(t).send(d)`.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    addr: &'a str,
    method: &'a str,
    path: &'a str,
    json: Option<&'a str>,
    token: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// `method path` on the admin API at `addr`.
    pub fn new(addr: &'a str, method: &'a str, path: &'a str) -> Self {
        Self {
            addr,
            method,
            path,
            json: None,
            token: None,
        }
    }

    /// A JSON body.
    pub fn json(self, json: Option<&'a str>) -> Self {
        Self { json, ..self }
    }

    /// The bearer token to send (`Authorization: Bearer <token>`).
    pub fn token(self, token: Option<&'a str>) -> Self {
        Self { token, ..self }
    }

    /// Sends it; returns the status and body, or why there is none within `timeout`.
    pub async fn send(self, timeout: Duration) -> Result<(u16, String), String> {
        let (addr, method, path) = (self.addr, self.method, self.path);
        tokio::time::timeout(timeout, self.exchange())
            .await
            .map_err(|_| format!("{method} http://{addr}{path}: no answer within {timeout:?}"))?
    }

    async fn exchange(self) -> Result<(u16, String), String> {
        let Self {
            addr,
            method,
            path,
            json,
            token,
        } = self;
        if [method, path, token.unwrap_or("")]
            .iter()
            .any(|p| p.contains(['\r', '\n']))
        {
            return Err("a request line or header must not contain CR or LF".into());
        }
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let body = json.unwrap_or("");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        );
        if json.is_some() {
            req.push_str("content-type: application/json\r\n");
        }
        if let Some(t) = token {
            req.push_str(&format!("authorization: Bearer {t}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("send to {addr}: {e}"))?;
        read_response(addr, &mut s).await
    }
}

/// Sends `method path` with an optional JSON body to `addr` without a credential; returns the
/// status and body.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    json: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    Request::new(addr, method, path)
        .json(json)
        .send(timeout)
        .await
}

async fn read_response(addr: &str, s: &mut tokio::net::TcpStream) -> Result<(u16, String), String> {
    let mut buf = Vec::new();
    s.take(MAX_RESPONSE as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("malformed response from {addr}"))?;
    let head = String::from_utf8_lossy(&buf[..at]);
    let rest = &buf[at + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in response from {addr}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The body of a chunked response, on bytes (chunk sizes count bytes, which may split a
/// multi-byte character); stops at the last chunk or at anything malformed.
fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..eol]);
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let rest = &s[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn chunks_that_split_a_character_are_joined_on_bytes() {
        let text = "h\u{e9}llo w\u{f6}rld \u{1f600}";
        let bytes = text.as_bytes();
        // Chunks of 2 bytes cut every multi-byte character in half.
        let mut wire = Vec::new();
        for c in bytes.chunks(2) {
            wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(String::from_utf8(dechunk(&wire)).as_deref(), Ok(text));
        // Malformed sizes and short chunks end the body without a panic.
        assert!(dechunk(b"zz\r\nabc").is_empty());
        assert_eq!(dechunk(b"5\r\nab"), b"");
    }
}
