//! The admin API's HTTP client (reqwest, rustls): what the CLI, the demo and the process tests
//! speak to a node with.
//!
//! Paths are built from segments ([`path`]), each percent-encoded, so a name can never add a
//! query, a fragment, another path segment or another request: `victim?dry-run=true` is one
//! segment. Bodies of any size are read whole, chunk by chunk; the call's deadline covers the
//! whole exchange.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use reqwest::{Method, Url};

/// How an admin client checks a node's HTTPS certificate and proves who it is (PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ClientTls {
    /// The CA that signed the nodes' admin certificates (the cluster CA); HTTPS needs it.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key, from the cluster CA: a credential instead of a token.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// An admin endpoint: `host:port` (HTTPS), `https://host:port` or `http://host:port` (for a
/// node started with `--admin-insecure-plaintext`); a path after it is ignored.
pub fn endpoint(addr: &str) -> Result<Url, String> {
    let addr = addr.trim();
    let with_scheme = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("https://{addr}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| format!("admin address {addr:?}: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "admin address {addr:?}: scheme {other:?} is not http or https"
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("admin address {addr:?} has no host"));
    }
    Ok(url)
}

/// A path of percent-encoded `segments`: `path(&["topics", name])`. A segment that is `.` or
/// `..` is refused: URLs treat those as moves in the path, not as names.
pub fn path(segments: &[&str]) -> Result<String, String> {
    if let Some(dot) = segments.iter().find(|s| matches!(**s, "." | "..")) {
        return Err(format!("{dot:?} cannot be sent as a name in a URL path"));
    }
    let mut url = Url::parse("http://x/").map_err(|e| e.to_string())?;
    url.path_segments_mut()
        .map_err(|()| "the base URL cannot have a path".to_string())?
        .clear()
        .extend(segments);
    Ok(url.path().to_string())
}

/// One admin request: `Request::new(addr, "POST", "/topics").json(Some(body)).token(t).send(d)`.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    addr: &'a str,
    method: &'a str,
    path: &'a str,
    query: Vec<(&'a str, String)>,
    json: Option<&'a str>,
    token: Option<&'a str>,
    tls: Option<&'a ClientTls>,
}

impl<'a> Request<'a> {
    /// `method path` on the admin API at `addr` (see [`endpoint`]); `path` is sent as given
    /// (build it with [`path`] when it carries names).
    pub fn new(addr: &'a str, method: &'a str, path: &'a str) -> Self {
        Self {
            addr,
            method,
            path,
            query: Vec::new(),
            json: None,
            token: None,
            tls: None,
        }
    }

    /// How to check the server's certificate (and which client certificate to present) over
    /// HTTPS.
    pub fn tls(self, tls: Option<&'a ClientTls>) -> Self {
        Self { tls, ..self }
    }

    /// A JSON body.
    pub fn json(self, json: Option<&'a str>) -> Self {
        Self { json, ..self }
    }

    /// The bearer token to send (`Authorization: Bearer <token>`).
    pub fn token(self, token: Option<&'a str>) -> Self {
        Self { token, ..self }
    }

    /// A query parameter (encoded).
    pub fn query(mut self, key: &'a str, value: impl ToString) -> Self {
        self.query.push((key, value.to_string()));
        self
    }

    /// Sends it; returns the status and body, or why there is none within `timeout`.
    pub async fn send(self, timeout: Duration) -> Result<(u16, String), String> {
        let (status, body) = self.send_bytes(timeout).await.map_err(|e| e.to_string())?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Sends it; returns the status and the raw body.
    pub async fn send_bytes(self, timeout: Duration) -> Result<(u16, Vec<u8>), SendError> {
        let mut body = Vec::new();
        let status = self.send_into(timeout, &mut body).await?;
        Ok((status, body))
    }

    /// Sends it and writes the body to `out` as it arrives (a large download); returns the
    /// status. A body cut short is an `Unreachable` error.
    pub async fn send_into(
        self,
        timeout: Duration,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u16, SendError> {
        let base = endpoint(self.addr).map_err(SendError::Request)?;
        let method = Method::from_bytes(self.method.as_bytes())
            .map_err(|e| SendError::Request(format!("method {:?}: {e}", self.method)))?;
        let mut url = base
            .join(self.path)
            .map_err(|e| SendError::Request(format!("path {:?}: {e}", self.path)))?;
        if !self.query.is_empty() {
            url.query_pairs_mut().extend_pairs(self.query.iter());
        }
        let shown = format!("{method} {url}");
        let tls = self.tls.cloned().unwrap_or_default();
        if url.scheme() == "https" && tls.ca.is_none() {
            return Err(SendError::Request(format!(
                "{shown}: HTTPS needs the CA that signed the node's certificate: pass \
                 --admin-ca FILE or set BROKER_ADMIN_CA (`broker dev` prints it); an http:// \
                 address reaches a node started with --admin-insecure-plaintext"
            )));
        }
        let mut req = client(&tls)?.request(method, url).timeout(timeout);
        if let Some(body) = self.json {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        if let Some(t) = self.token {
            req = req.bearer_auth(t);
        }
        let mut resp = req.send().await.map_err(|e| classify(&shown, e))?;
        let status = resp.status().as_u16();
        while let Some(chunk) = resp.chunk().await.map_err(|e| classify(&shown, e))? {
            out.write_all(&chunk)
                .map_err(|e| SendError::Request(format!("{shown}: writing the answer: {e}")))?;
        }
        Ok(status)
    }
}

/// The process's HTTP client for `tls` (built once per setting); each request carries its own
/// deadline. No idle connections are kept: a pooled connection belongs to the runtime that
/// made it, and a process may run several (tests, the demo's nodes).
fn client(tls: &ClientTls) -> Result<reqwest::Client, SendError> {
    type Clients = Mutex<HashMap<ClientTls, reqwest::Client>>;
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    let clients = CLIENTS.get_or_init(Clients::default);
    if let Some(c) = clients.lock().ok().and_then(|m| m.get(tls).cloned()) {
        return Ok(c);
    }
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(0);
    if let Some(ca) = &tls.ca {
        let identity = tls
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let config =
            consensus_tls::admin_client_config(ca, identity).map_err(SendError::Request)?;
        builder = builder.use_preconfigured_tls(config);
    }
    let client = builder
        .build()
        .map_err(|e| SendError::Request(format!("HTTP client: {e}")))?;
    if let Ok(mut m) = clients.lock() {
        m.insert(tls.clone(), client.clone());
    }
    Ok(client)
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The request could not be built (bad address, path or method); nothing was sent.
    #[error("{0}")]
    Request(String),
    /// The node could not be reached, or did not answer in time: another node may.
    #[error("{0}")]
    Unreachable(String),
}

fn classify(shown: &str, e: reqwest::Error) -> SendError {
    let why = if e.is_timeout() {
        "no answer in time".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "the exchange failed".to_string()
    };
    // reqwest's Display omits the cause (connection refused, ...): walk the chain.
    let mut detail = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    SendError::Unreachable(if detail.is_empty() {
        format!("{shown}: {why}")
    } else {
        format!("{shown}: {why}: {detail}")
    })
}

/// Sends `method path` with an optional JSON body to `addr` without a credential, checking an
/// HTTPS server with `tls`; returns the status and body.
pub async fn request(
    addr: &str,
    tls: Option<&ClientTls>,
    method: &str,
    path: &str,
    json: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    Request::new(addr, method, path)
        .tls(tls)
        .json(json)
        .send(timeout)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_one_path_segment() {
        assert_eq!(path(&["topics", "orders"]).as_deref(), Ok("/topics/orders"));
        assert!(path(&["topics", ".."]).is_err());
        assert!(path(&["topics", "."]).is_err());
        for evil in [
            "victim?dry-run=true",
            "victim2#x",
            "a/b",
            "x\r\nDELETE /topics/y",
            "../x",
        ] {
            let p = path(&["topics", evil]).expect("a path");
            let url = Url::parse("http://n:1/")
                .and_then(|b| b.join(&p))
                .expect("joins");
            assert_eq!(url.query(), None, "{evil:?} made a query: {url}");
            assert_eq!(url.fragment(), None, "{evil:?} made a fragment: {url}");
            let segs: Vec<&str> = url.path_segments().map(|s| s.collect()).unwrap_or_default();
            assert_eq!(segs.len(), 2, "{evil:?} is not one segment: {url}");
            assert!(!url.as_str().contains(['\r', '\n', ' ']), "{url}");
        }
    }

    #[test]
    fn endpoints_take_addresses_and_urls() {
        assert_eq!(
            endpoint("127.0.0.1:9093").map(|u| u.to_string()).as_deref(),
            Ok("https://127.0.0.1:9093/")
        );
        assert_eq!(
            endpoint("http://h:1").map(|u| u.to_string()).as_deref(),
            Ok("http://h:1/")
        );
        assert!(endpoint("https://h:1").is_ok());
        assert!(endpoint("ftp://h:1").is_err());
        assert!(endpoint("http://").is_err());
    }
}
