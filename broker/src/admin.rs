//! The HTTP/JSON admin API every node serves (axum), and `/metrics` in Prometheus text format.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /cluster/status` | this node's consensus status |
//! | `GET /cluster/quorum` | the quorum as the leader sees it ([`crate::quorum::Quorum`]): lags, last contact, roles |
//! | `GET /cluster/backup` | a backup of the metadata image ([`consensus_api::backup`] file format), after a read barrier; streamed; needs the admin credential even where reads are open |
//! | `POST /cluster/learners` | add `{id, address}` as a learner (it receives the log) |
//! | `PUT /cluster/voters` | make `{voters}` the voting set (promote learners, demote voters) |
//! | `DELETE /cluster/members/{id}` | remove a member (never the last voter) |
//! | `POST /cluster/leader` | move the consensus leadership to `{id}` |
//! | `GET /brokers` | registered brokers |
//! | `GET /brokers/{id}` | one broker |
//! | `DELETE /brokers/{id}` | unregister a fenced (dead) broker, as KIP-1073's `kafka-cluster unregister` |
//! | `POST /brokers/{id}/cancel-shutdown` | `{epoch}` (optional): a broker in controlled shutdown is available again |
//! | `POST /broker-rpc/register` | broker RPC: register `{broker_id, incarnation, endpoints, rack}`: the epoch |
//! | `POST /broker-rpc/{id}/heartbeat` | broker RPC: `{epoch, metadata_offset}` |
//! | `POST /broker-rpc/{id}/shutdown` | broker RPC: `{epoch}`: controlled shutdown |
//! | `GET /topics?view=full\|summary\|names`, `GET /topics/{name}` | topics (`full`, the default: with partitions, leaders, ISRs; `summary`: counts; `names`: names only) |
//! | `POST /topics` | create `{name, partitions, replication_factor, configs}` |
//! | `DELETE /topics/{name}` | delete |
//! | `POST /topics/{name}/partitions` | grow to `{total}` partitions |
//! | `POST /topics/{name}/configs` | `{set: {key: value}, remove: [key]}` ([`crate::configs`]) |
//! | `GET /topic-configs` | the known topic configs, their types and defaults |
//! | `POST /elections/preferred` | `{topics}` (all when empty): leadership back to each partition's first replica where it is in sync: `{moved}` |
//! | `GET /metadata/changes?since=N&max=M&wait_ms=W` | the feed, long-polling up to `W` ms |
//! | `GET /metrics` | Prometheus text |
//! | `GET /openapi.json` | the OpenAPI 3 description of this API (`broker/api/openapi.json`) |
//!
//! Errors are JSON `{"error": kind, "reason": text}` with a 4xx status for bad requests (unknown
//! topic or broker, or no such route, 404; a method the route does not serve 405; duplicate or
//! stale epoch 409; invalid 400; malformed JSON or path 400; a body over 1 MiB 413; no
//! credential 401, a wrong one 403) and 5xx when consensus is unavailable (503 with the leader
//! hint, 504 on timeout). A refused request changed nothing, and a request the current image
//! already refuses is answered without a log entry ([`Controller::submit_checked`]).
//!
//! **Feed** (`/metadata/changes`): changes with an offset strictly greater than `since`, oldest
//! first, at most `max` (default 1000, 1 to 10,000); with `wait_ms` (at most 30,000; more is
//! refused with 400) the call waits that long for a first change. A 410 `feed_gap` means `since` fell behind the retained
//! feed: read the image again. Quiet heartbeats (that fence or unfence nothing) are not in it.
//!
//! **Credentials** ([`AdminAuth`]): every request that changes state (any method but `GET` and
//! `HEAD`) needs `Authorization: Bearer <token>` or, over HTTPS, a client certificate from the
//! cluster CA ([`VerifiedClientCertificate`]); reads too when so configured. The broker
//! RPCs (`/broker-rpc/...`: what a data-plane broker process calls) are a separate API: with a
//! broker token configured they take only it, and the admin routes never take it, so a broker's
//! credential cannot change topics and an operator's cannot pose as a broker. Without a token
//! configured the API is open, which a program must choose explicitly
//! ([`AdminAuth::InsecureOpen`]).
//!
//! **Limits**: topic names 1 to [`MAX_TOPIC_NAME_LEN`] characters of `[a-zA-Z0-9._-]`; at most
//! [`configs::MAX_CONFIGS`] configs, each a known key ([`configs::TOPIC_CONFIGS`]) with a value
//! of its type up to [`configs::MAX_CONFIG_VALUE_LEN`] bytes; at most [`MAX_ENDPOINTS`]
//! endpoints of up to [`MAX_ENDPOINT_LEN`] bytes, a rack up to [`MAX_RACK_LEN`] bytes; checked
//! before anything is proposed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use consensus_api::ConsensusError;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::configs;
use crate::controller::{Controller, ControllerError};
use crate::model::*;
use crate::quorum::Quorum;

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Longest feed long-poll, in milliseconds.
pub const MAX_FEED_WAIT_MS: u64 = 30_000;
/// Most changes one feed read returns.
pub const MAX_FEED_CHANGES: usize = 10_000;
/// Most topics one preferred-leader election names.
pub const MAX_ELECTION_TOPICS: usize = 1000;
/// Most endpoints per broker registration.
pub const MAX_ENDPOINTS: usize = 16;
/// Longest endpoint.
pub const MAX_ENDPOINT_LEN: usize = 255;
/// Longest rack name.
pub const MAX_RACK_LEN: usize = 64;
/// Shortest bearer token accepted as a credential.
pub const MIN_TOKEN_LEN: usize = 16;

/// Who may use the admin API.
#[derive(Clone)]
pub enum AdminAuth {
    /// Requests that change state need a credential, reads too when `protect_reads` is set:
    /// `Authorization: Bearer <token>` when a token is set, or, when `client_certificates` is
    /// set, a client certificate the HTTPS handshake verified against the cluster CA (see
    /// [`VerifiedClientCertificate`]). The broker RPCs need `broker_token` when one is set (and
    /// then only it), else the same credentials. Tokens are compared in constant time.
    Required {
        /// The operators' shared secret (at least [`MIN_TOKEN_LEN`] bytes), if any.
        token: Option<Arc<str>>,
        /// Whether a verified client certificate is a credential.
        client_certificates: bool,
        /// Whether `GET` requests need a credential as well.
        protect_reads: bool,
        /// The brokers' secret for `/broker-rpc/...`, if it differs from the operators'.
        broker_token: Option<Arc<str>>,
    },
    /// No credential is checked: anyone who reaches the port can change the metadata, fence or
    /// shut down brokers. For local experiments only; chosen explicitly.
    InsecureOpen,
}

/// Marks a request that arrived over HTTPS with a client certificate that the handshake
/// verified against the cluster CA; the server puts it in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedClientCertificate;

/// Where the broker RPCs live: their own credential applies under it.
pub const BROKER_RPC_PREFIX: &str = "/broker-rpc/";

fn check_token(token: &str) -> Result<Arc<str>, String> {
    let token = token.trim();
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "a token must be at least {MIN_TOKEN_LEN} characters (got {})",
            token.len()
        ));
    }
    Ok(token.into())
}

impl AdminAuth {
    /// Token authentication for writes (and reads when `protect_reads`); refuses a token
    /// shorter than [`MIN_TOKEN_LEN`] bytes.
    pub fn token(token: &str, protect_reads: bool) -> Result<Self, String> {
        Ok(Self::Required {
            token: Some(check_token(token).map_err(|e| format!("the admin token: {e}"))?),
            client_certificates: false,
            protect_reads,
            broker_token: None,
        })
    }

    /// Client-certificate authentication only (the admin API must be served over HTTPS).
    pub fn client_certificates(protect_reads: bool) -> Self {
        Self::Required {
            token: None,
            client_certificates: true,
            protect_reads,
            broker_token: None,
        }
    }

    /// The same, also taking a verified client certificate as a credential.
    pub fn or_client_certificates(self) -> Self {
        match self {
            Self::Required {
                token,
                protect_reads,
                broker_token,
                ..
            } => Self::Required {
                token,
                client_certificates: true,
                protect_reads,
                broker_token,
            },
            Self::InsecureOpen => Self::client_certificates(false),
        }
    }

    /// The same, with a separate token for the broker RPCs; refuses one equal to the
    /// operators' token (it would not separate anything).
    pub fn with_broker_token(self, broker: &str) -> Result<Self, String> {
        let broker = check_token(broker).map_err(|e| format!("the broker token: {e}"))?;
        match self {
            Self::Required {
                token,
                client_certificates,
                protect_reads,
                ..
            } => {
                if token
                    .as_ref()
                    .is_some_and(|t| bool::from(t.as_bytes().ct_eq(broker.as_bytes())))
                {
                    return Err("the broker token must differ from the admin token".into());
                }
                Ok(Self::Required {
                    token,
                    client_certificates,
                    protect_reads,
                    broker_token: Some(broker),
                })
            }
            Self::InsecureOpen => Err(
                "a broker token needs an admin credential too (the API is open otherwise)".into(),
            ),
        }
    }

    /// Whether a verified client certificate is a credential here.
    pub fn takes_client_certificates(&self) -> bool {
        matches!(
            self,
            Self::Required {
                client_certificates: true,
                ..
            }
        )
    }

    /// A fresh random token (32 hex digits) for development setups.
    pub fn generate_token() -> String {
        let bytes: [u8; 16] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Checks one request's credential: its bearer token, and whether it came with a verified
    /// client certificate.
    fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        certificate: bool,
    ) -> Result<(), ApiError> {
        let Self::Required {
            token,
            client_certificates,
            protect_reads,
            broker_token,
        } = self
        else {
            return Ok(());
        };
        let broker_rpc = path.starts_with(BROKER_RPC_PREFIX);
        let read = method == Method::GET || method == Method::HEAD;
        // A backup is every byte of the metadata: an admin's request even where reads are open.
        if read && !protect_reads && !broker_rpc && path != BACKUP_PATH {
            return Ok(());
        }
        let (expected, takes_cert, which) = match (broker_rpc, broker_token) {
            (true, Some(b)) => (Some(b), false, "the broker token"),
            _ => (
                token.as_ref(),
                *client_certificates,
                match (token.is_some(), *client_certificates) {
                    (true, true) => "the admin token or a client certificate from the cluster CA",
                    (false, true) => "a client certificate from the cluster CA",
                    _ => "the admin token",
                },
            ),
        };
        if takes_cert && certificate {
            return Ok(());
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match (given, expected) {
            (None, _) => Err(api(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!(
                    "this request needs {which}: send `Authorization: Bearer <token>` (the \
                     CLI's --admin-token-file or BROKER_ADMIN_TOKEN) or, over HTTPS, a client \
                     certificate (--admin-cert and --admin-key)"
                ),
            )),
            (Some(g), Some(expected))
                if bool::from(g.trim().as_bytes().ct_eq(expected.as_bytes())) =>
            {
                Ok(())
            }
            (Some(_), _) => Err(api(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the credential is not {which} of this node"),
            )),
        }
    }
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Required {
                token,
                client_certificates,
                protect_reads,
                broker_token,
            } => f
                .debug_struct("Required")
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .field("client_certificates", client_certificates)
                .field("protect_reads", protect_reads)
                .field("broker_token", &broker_token.as_ref().map(|_| "<redacted>"))
                .finish(),
            Self::InsecureOpen => f.write_str("InsecureOpen"),
        }
    }
}

async fn authenticate(
    State(auth): State<AdminAuth>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "-".into());
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let write = method != Method::GET && method != Method::HEAD;
    let certificate = req
        .extensions()
        .get::<VerifiedClientCertificate>()
        .is_some();
    if let Err(e) = auth.check(&method, &path, req.headers(), certificate) {
        tracing::warn!(%peer, %method, path, "admin request refused: {}", e.reason);
        return Err(e);
    }
    let resp = next.run(req).await;
    // Every change an operator (or a broker) asked for, with who asked and what came of it.
    if write {
        let status = resp.status().as_u16();
        if path.starts_with(BROKER_RPC_PREFIX) && path.ends_with("/heartbeat") && status < 300 {
            // Every few seconds per broker: not news.
            tracing::debug!(%peer, path, status, "broker heartbeat");
        } else {
            tracing::info!(%peer, %method, path, status, client_cert = certificate, "admin change");
        }
    }
    Ok(resp)
}

#[derive(Clone)]
struct App {
    ctl: Controller,
    metrics: Option<PrometheusHandle>,
}

/// The admin router of one node; every request passes `auth` first.
pub fn router(ctl: Controller, metrics: Option<PrometheusHandle>, auth: AdminAuth) -> Router {
    Router::new()
        .route("/cluster/status", get(cluster_status))
        .route("/cluster/quorum", get(cluster_quorum))
        .route("/cluster/backup", get(cluster_backup))
        .route("/cluster/learners", post(add_learner))
        .route("/cluster/voters", put(set_voters))
        .route("/cluster/members/{id}", delete(remove_member))
        .route("/cluster/leader", post(transfer_leader))
        .route("/brokers", get(list_brokers))
        .route("/brokers/{id}", get(describe_broker).delete(unregister))
        .route("/brokers/{id}/cancel-shutdown", post(cancel_shutdown))
        .route("/broker-rpc/register", post(register))
        .route("/broker-rpc/{id}/heartbeat", post(heartbeat))
        .route("/broker-rpc/{id}/shutdown", post(shutdown))
        .route("/topics", get(list_topics).post(create_topic))
        .route("/topics/{name}", get(describe_topic).delete(delete_topic))
        .route("/topics/{name}/partitions", post(add_partitions))
        .route("/topics/{name}/configs", post(alter_configs))
        .route("/topic-configs", get(topic_configs))
        .route("/elections/preferred", post(elect_preferred))
        .route("/metadata/changes", get(changes))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .with_state(App { ctl, metrics })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(auth, authenticate))
}

fn too_long(what: &str, len: usize, max: usize) -> ApiError {
    api(
        StatusCode::BAD_REQUEST,
        "invalid",
        format!("{what} is {len} bytes long; at most {max} are allowed"),
    )
}

fn check_name(name: &str) -> Result<(), ApiError> {
    check_topic_name(name).map_err(|e| ControllerError::Metadata(e).into())
}

async fn no_route(uri: axum::http::Uri) -> ApiError {
    api(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no such route: {} (GET /openapi.json lists them)",
            uri.path()
        ),
    )
}

async fn no_method(method: Method, uri: axum::http::Uri) -> ApiError {
    api(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not serve {method} (GET /openapi.json lists what it does)",
            uri.path()
        ),
    )
}

/// A path parameter, or a JSON 400 naming what was wrong with it.
fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|e| api(StatusCode::BAD_REQUEST, "malformed", e.body_text()))
}

/// An error answer: status plus `{"error", "reason"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    reason: String,
    leader: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    leader: Option<u64>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("broker_admin_errors_total", "kind" => self.kind).increment(1);
        let body = ErrorBody {
            error: self.kind,
            reason: &self.reason,
            leader: self.leader,
        };
        (self.status, Json(body)).into_response()
    }
}

fn api(status: StatusCode, kind: &'static str, reason: impl ToString) -> ApiError {
    ApiError {
        status,
        kind,
        reason: reason.to_string(),
        leader: None,
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        use MetadataError as M;
        let reason = e.to_string();
        match e {
            ControllerError::Metadata(m) => match m {
                M::UnknownTopic(_) | M::UnknownBroker(_) | M::UnknownPartition { .. } => {
                    api(StatusCode::NOT_FOUND, "not_found", reason)
                }
                M::DuplicateTopic(_) => api(StatusCode::CONFLICT, "duplicate", reason),
                M::Conflict(_) => api(StatusCode::CONFLICT, "conflict", reason),
                M::StaleBrokerEpoch { .. } | M::StalePartitionEpoch { .. } => {
                    api(StatusCode::CONFLICT, "stale_epoch", reason)
                }
                M::InvalidPartitions(_) | M::InvalidReplicationFactor { .. } | M::Invalid(_) => {
                    api(StatusCode::BAD_REQUEST, "invalid", reason)
                }
            },
            ControllerError::FeedGap(_) => api(StatusCode::GONE, "feed_gap", reason),
            ControllerError::Consensus(c) => match c {
                ConsensusError::NotLeader { leader } => ApiError {
                    leader,
                    ..api(StatusCode::SERVICE_UNAVAILABLE, "no_leader", reason)
                },
                ConsensusError::ShuttingDown => {
                    api(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", reason)
                }
                ConsensusError::Timeout(_) => api(StatusCode::GATEWAY_TIMEOUT, "timeout", reason),
                ConsensusError::OutcomeUnknown(_) => {
                    api(StatusCode::GATEWAY_TIMEOUT, "outcome_unknown", reason)
                }
                ConsensusError::InvalidRequest(_) => {
                    api(StatusCode::BAD_REQUEST, "invalid", reason)
                }
                // The leader could not be reached, with nothing taken that could commit later
                // (a request that may have been is `OutcomeUnknown`): another try may succeed.
                ConsensusError::Transport(_) => {
                    api(StatusCode::SERVICE_UNAVAILABLE, "unreachable", reason)
                }
                _ => api(StatusCode::INTERNAL_SERVER_ERROR, "internal", reason),
            },
        }
    }
}

fn body<T>(r: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    r.map(|Json(v)| v).map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            api(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
            )
        } else {
            api(StatusCode::BAD_REQUEST, "malformed", e.body_text())
        }
    })
}

async fn cluster_status(State(app): State<App>) -> Json<consensus_api::Status> {
    Json(app.ctl.node().status())
}

async fn cluster_quorum(State(app): State<App>) -> Result<Json<Quorum>, ApiError> {
    let node = app.ctl.node();
    let st = node.leader_status().await.map_err(ControllerError::from)?;
    Ok(Json(Quorum::from_leader(node.cluster_id(), &st)))
}

/// The path of the backup download.
pub const BACKUP_PATH: &str = "/cluster/backup";

/// Bytes per chunk of a streamed backup.
const BACKUP_CHUNK_BYTES: usize = 256 << 10;

/// A blocking writer that hands full chunks to an async body stream (a bounded channel: the
/// writer waits while the client is slow). A client that went away ends the write.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(BACKUP_CHUNK_BYTES));
        self.tx
            .blocking_send(Ok(chunk.into()))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = BACKUP_CHUNK_BYTES - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= BACKUP_CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// `GET /cluster/backup`: a read barrier, a point-in-time view of the image, then the backup
/// file streamed as it is written. A failure after the first byte aborts the body, which the
/// client's check of the file (length, checksum) then refuses.
async fn cluster_backup(State(app): State<App>) -> Result<Response, ApiError> {
    let node = app.ctl.node();
    let (header, view) = node.backup().await.map_err(ControllerError::from)?;
    let index = header.index;
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut w = ChunkWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(BACKUP_CHUNK_BYTES),
        };
        match consensus_api::backup::write(&mut w, header, view) {
            Ok(info) => tracing::info!(
                index = info.header.index,
                bytes = info.image_bytes,
                "backup sent"
            ),
            Err(e) => {
                tracing::warn!("backup stream failed: {e}");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"metadata-{index}.backup\""),
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// `POST /cluster/learners`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnerReq {
    id: consensus_api::NodeId,
    address: String,
}

async fn add_learner(
    State(app): State<App>,
    req: Result<Json<LearnerReq>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let r = body(req)?;
    if r.id == 0 || u32::try_from(r.id).is_err() {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "node id {} is out of range: node ids are broker ids, 1 to {}",
                r.id,
                u32::MAX
            ),
        ));
    }
    if r.address.is_empty() || r.address.len() > MAX_ENDPOINT_LEN {
        return Err(too_long("the address", r.address.len(), MAX_ENDPOINT_LEN));
    }
    check_address(&r.address)?;
    let st = app.ctl.node().status();
    if st.voters.contains(&r.id) || st.learners.contains(&r.id) {
        return Err(api(
            StatusCode::CONFLICT,
            "conflict",
            format!("node {} is already a member", r.id),
        ));
    }
    app.ctl
        .node()
        .add_learner(r.id, r.address)
        .await
        .map_err(ControllerError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Checks that `address` is `host:port` (a port from 1 to 65535, a host of letters, digits,
/// `.`, `-`, `_`, or a bracketed IPv6 address), which a transport can dial.
fn check_address(address: &str) -> Result<(), ApiError> {
    let invalid = |why: &str| {
        api(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("address {address:?} is not host:port: {why}"),
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(|| invalid("no port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(invalid("the port must be 1 to 65535")),
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .map(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
    let named = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if bare == Some(true) || (bare.is_none() && named) {
        Ok(())
    } else {
        Err(invalid(
            "the host must be a name, an IPv4 address or [an IPv6 address]",
        ))
    }
}

/// `PUT /cluster/voters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VotersReq {
    voters: Vec<consensus_api::NodeId>,
}

async fn set_voters(
    State(app): State<App>,
    req: Result<Json<VotersReq>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let r = body(req)?;
    if r.voters.is_empty() {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            "the voting set cannot be empty",
        ));
    }
    let voters: std::collections::BTreeSet<_> = r.voters.iter().copied().collect();
    if voters.len() != r.voters.len() {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            "a node is listed more than once in the voting set",
        ));
    }
    let st = app.ctl.node().status();
    if let Some(stranger) = voters
        .iter()
        .find(|v| !st.voters.contains(v) && !st.learners.contains(v))
    {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("node {stranger} is not a member: add it as a learner first"),
        ));
    }
    app.ctl
        .node()
        .change_voters(voters)
        .await
        .map_err(ControllerError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member(
    State(app): State<App>,
    id: Result<Path<consensus_api::NodeId>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = path(id)?;
    let st = app.ctl.node().status();
    if !st.voters.contains(&id) && !st.learners.contains(&id) {
        return Err(api(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("node {id} is not a member"),
        ));
    }
    if st.voters.len() == 1 && st.voters.contains(&id) {
        return Err(api(
            StatusCode::CONFLICT,
            "conflict",
            format!("node {id} is the last voter: removing it would end the cluster"),
        ));
    }
    app.ctl
        .node()
        .remove_node(id)
        .await
        .map_err(ControllerError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /cluster/leader`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaderReq {
    id: consensus_api::NodeId,
}

async fn transfer_leader(
    State(app): State<App>,
    req: Result<Json<LeaderReq>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let r = body(req)?;
    if !app.ctl.node().status().voters.contains(&r.id) {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("node {} is not a voter: only a voter can lead", r.id),
        ));
    }
    app.ctl
        .node()
        .transfer_leader(r.id)
        .await
        .map_err(ControllerError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_brokers(State(app): State<App>) -> Result<Json<Vec<BrokerRegistration>>, ApiError> {
    let img = app.ctl.image().await?;
    Ok(Json(img.brokers.into_values().collect()))
}

/// `POST /brokers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterReq {
    broker_id: BrokerId,
    incarnation: u64,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    rack: Option<String>,
}

#[derive(Serialize)]
struct EpochResp {
    epoch: u64,
}

async fn register(
    State(app): State<App>,
    req: Result<Json<RegisterReq>, JsonRejection>,
) -> Result<Json<EpochResp>, ApiError> {
    let r = body(req)?;
    if r.endpoints.len() > MAX_ENDPOINTS {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "{} endpoints; at most {MAX_ENDPOINTS} are allowed",
                r.endpoints.len()
            ),
        ));
    }
    if let Some(e) = r.endpoints.iter().find(|e| e.len() > MAX_ENDPOINT_LEN) {
        return Err(too_long("an endpoint", e.len(), MAX_ENDPOINT_LEN));
    }
    if let Some(rack) = r.rack.as_ref().filter(|r| r.len() > MAX_RACK_LEN) {
        return Err(too_long("the rack", rack.len(), MAX_RACK_LEN));
    }
    let epoch = app
        .ctl
        .register_broker(r.broker_id, r.incarnation, r.endpoints, r.rack)
        .await?;
    Ok(Json(EpochResp { epoch }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatReq {
    epoch: u64,
    #[serde(default)]
    metadata_offset: u64,
}

async fn heartbeat(
    State(app): State<App>,
    id: Result<Path<BrokerId>, PathRejection>,
    req: Result<Json<HeartbeatReq>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let id = path(id)?;
    let r = body(req)?;
    app.ctl.heartbeat(id, r.epoch, r.metadata_offset).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EpochReq {
    epoch: u64,
}

async fn shutdown(
    State(app): State<App>,
    id: Result<Path<BrokerId>, PathRejection>,
    req: Result<Json<EpochReq>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let id = path(id)?;
    let r = body(req)?;
    app.ctl
        .submit_checked(MetadataCommand::BeginControlledShutdown {
            broker_id: id,
            epoch: r.epoch,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /topics?view=...`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicsQuery {
    #[serde(default)]
    view: TopicsView,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum TopicsView {
    #[default]
    Full,
    Summary,
    Names,
}

/// One topic in `view=summary`.
#[derive(Serialize)]
struct TopicSummary {
    name: String,
    id: TopicId,
    partitions: usize,
    replication_factor: usize,
    offline_partitions: usize,
    under_replicated_partitions: usize,
    configs: BTreeMap<String, String>,
}

impl From<Topic> for TopicSummary {
    fn from(t: Topic) -> Self {
        Self {
            id: t.id,
            partitions: t.partitions.len(),
            replication_factor: t.partitions.first().map_or(0, |p| p.replicas.len()),
            offline_partitions: t.partitions.iter().filter(|p| p.leader.is_none()).count(),
            under_replicated_partitions: t
                .partitions
                .iter()
                .filter(|p| p.isr.len() < p.replicas.len())
                .count(),
            name: t.name,
            configs: t.configs,
        }
    }
}

/// `POST /brokers/{id}/cancel-shutdown`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelReq {
    epoch: Option<u64>,
}

async fn cancel_shutdown(
    State(app): State<App>,
    id: Result<Path<BrokerId>, PathRejection>,
    raw: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let id = path(id)?;
    // The body is optional: none (or an empty one) means the broker's current epoch.
    let req: Option<CancelReq> = if raw.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(serde_json::from_slice(&raw).map_err(|e| {
            api(
                StatusCode::BAD_REQUEST,
                "malformed",
                format!("the body is not a cancel-shutdown request: {e}"),
            )
        })?)
    };
    let epoch = match req.and_then(|r| r.epoch) {
        Some(e) => e,
        None => app
            .ctl
            .image()
            .await?
            .brokers
            .get(&id)
            .map(|b| b.epoch)
            .ok_or(ControllerError::Metadata(MetadataError::UnknownBroker(id)))?,
    };
    app.ctl
        .submit_checked(MetadataCommand::CancelControlledShutdown {
            broker_id: id,
            epoch,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_topics(
    State(app): State<App>,
    q: Result<Query<TopicsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| api(StatusCode::BAD_REQUEST, "malformed", e.body_text()))?;
    let img = app.ctl.image().await?;
    let topics = img.topics.into_values();
    Ok(match q.view {
        TopicsView::Full => Json(topics.collect::<Vec<_>>()).into_response(),
        TopicsView::Summary => {
            Json(topics.map(TopicSummary::from).collect::<Vec<_>>()).into_response()
        }
        TopicsView::Names => Json(topics.map(|t| t.name).collect::<Vec<_>>()).into_response(),
    })
}

/// `POST /topics`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTopicReq {
    name: String,
    partitions: u32,
    replication_factor: u16,
    #[serde(default)]
    configs: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct CreatedResp {
    topic_id: TopicId,
    assignment: Vec<Vec<BrokerId>>,
}

async fn create_topic(
    State(app): State<App>,
    req: Result<Json<CreateTopicReq>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedResp>), ApiError> {
    let r = body(req)?;
    check_name(&r.name)?;
    configs::check_all(&r.configs).map_err(ControllerError::Metadata)?;
    let (topic_id, assignment) = app
        .ctl
        .create_topic(&r.name, r.partitions, r.replication_factor, r.configs)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedResp {
            topic_id,
            assignment,
        }),
    ))
}

async fn describe_topic(
    State(app): State<App>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Topic>, ApiError> {
    let name = path(name)?;
    check_name(&name)?;
    let img = app.ctl.image().await?;
    img.topics
        .get(&name)
        .cloned()
        .map(Json)
        .ok_or_else(|| ControllerError::Metadata(MetadataError::UnknownTopic(name)).into())
}

async fn delete_topic(
    State(app): State<App>,
    name: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let name = path(name)?;
    check_name(&name)?;
    app.ctl
        .submit_checked(MetadataCommand::DeleteTopic { name })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /topics/{name}/partitions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddPartitionsReq {
    total: u32,
}

async fn add_partitions(
    State(app): State<App>,
    name: Result<Path<String>, PathRejection>,
    req: Result<Json<AddPartitionsReq>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let name = path(name)?;
    check_name(&name)?;
    let r = body(req)?;
    app.ctl
        .submit_checked(MetadataCommand::CreatePartitions {
            name,
            total: r.total,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /topics/{name}/configs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlterConfigsReq {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn alter_configs(
    State(app): State<App>,
    name: Result<Path<String>, PathRejection>,
    req: Result<Json<AlterConfigsReq>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let name = path(name)?;
    check_name(&name)?;
    let r = body(req)?;
    if r.set.is_empty() && r.remove.is_empty() {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            "nothing to change: give `set` or `remove`",
        ));
    }
    if r.remove.len() > configs::MAX_CONFIGS {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!(
                "at most {} configs can be removed at once",
                configs::MAX_CONFIGS
            ),
        ));
    }
    app.ctl
        .submit_checked(MetadataCommand::AlterTopicConfig {
            name,
            set: r.set,
            remove: r.remove,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /elections/preferred`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ElectReq {
    #[serde(default)]
    topics: Vec<String>,
}

#[derive(Serialize)]
struct ElectedResp {
    moved: u64,
}

async fn elect_preferred(
    State(app): State<App>,
    req: Result<Json<ElectReq>, JsonRejection>,
) -> Result<Json<ElectedResp>, ApiError> {
    let r = body(req)?;
    if r.topics.len() > MAX_ELECTION_TOPICS {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("at most {MAX_ELECTION_TOPICS} topics per election (none: every topic)"),
        ));
    }
    r.topics.iter().try_for_each(|t| check_name(t))?;
    let moved = app.ctl.elect_preferred_leaders(r.topics).await?;
    Ok(Json(ElectedResp { moved }))
}

async fn topic_configs() -> Json<&'static [configs::ConfigSpec]> {
    Json(configs::TOPIC_CONFIGS)
}

async fn describe_broker(
    State(app): State<App>,
    id: Result<Path<BrokerId>, PathRejection>,
) -> Result<Json<BrokerRegistration>, ApiError> {
    let id = path(id)?;
    let img = app.ctl.image().await?;
    img.brokers
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| ControllerError::Metadata(MetadataError::UnknownBroker(id)).into())
}

/// Unregisters a broker that is fenced (dead) or shutting down; a live one would only register
/// again, so it is refused with a reason.
async fn unregister(
    State(app): State<App>,
    id: Result<Path<BrokerId>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = path(id)?;
    let img = app.ctl.image().await?;
    let b = img
        .brokers
        .get(&id)
        .ok_or(ControllerError::Metadata(MetadataError::UnknownBroker(id)))?;
    if !b.fenced && !b.shutting_down {
        return Err(api(
            StatusCode::CONFLICT,
            "broker_alive",
            format!(
                "broker {id} is alive (unfenced and heartbeating): stop it, or wait until its \
                 session expires and it is fenced, then unregister it"
            ),
        ));
    }
    app.ctl
        .submit_checked(MetadataCommand::UnregisterBroker { broker_id: id })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    #[serde(default)]
    since: u64,
    max: Option<usize>,
    wait_ms: Option<u64>,
}

async fn changes(
    State(app): State<App>,
    q: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<MetadataChange>>, ApiError> {
    let Query(q) = q.map_err(|e| api(StatusCode::BAD_REQUEST, "malformed", e.body_text()))?;
    let wait_ms = q.wait_ms.unwrap_or(0);
    if wait_ms > MAX_FEED_WAIT_MS {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("wait_ms={wait_ms}: a long poll waits at most {MAX_FEED_WAIT_MS} ms"),
        ));
    }
    let max = q.max.unwrap_or(1000);
    if !(1..=MAX_FEED_CHANGES).contains(&max) {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("max={max}: one read returns 1 to {MAX_FEED_CHANGES} changes"),
        ));
    }
    let wait = Duration::from_millis(wait_ms);
    Ok(Json(app.ctl.changes_since(q.since, max, wait).await?))
}

/// See [`crate::fuzzing::admin_bodies`].
pub(crate) fn fuzz_bodies(data: &[u8]) {
    let _ = serde_json::from_slice::<RegisterReq>(data);
    let _ = serde_json::from_slice::<HeartbeatReq>(data);
    let _ = serde_json::from_slice::<EpochReq>(data);
    let _ = serde_json::from_slice::<CreateTopicReq>(data);
    let _ = serde_json::from_slice::<AddPartitionsReq>(data);
    let _ = serde_json::from_slice::<ElectReq>(data);
    let _ = serde_json::from_slice::<CancelReq>(data);
    let _ = serde_json::from_slice::<LearnerReq>(data);
    let _ = serde_json::from_slice::<VotersReq>(data);
    let _ = serde_json::from_slice::<LeaderReq>(data);
    if let Ok(r) = serde_json::from_slice::<AlterConfigsReq>(data) {
        let _ = r.set.iter().try_for_each(|(k, v)| configs::check(k, v));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = check_topic_name(s);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = serde_urlencoded_query(s);
    }
}

/// The change feed's query string, parsed as axum does.
fn serde_urlencoded_query(s: &str) -> Result<ChangesQuery, String> {
    axum::extract::Query::<ChangesQuery>::try_from_uri(
        &format!("/metadata/changes?{s}")
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| e.to_string())?,
    )
    .map(|q| q.0)
    .map_err(|e| e.body_text())
}

/// The OpenAPI description, kept in the repository beside the crate.
pub const OPENAPI: &str = include_str!("../api/openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Counts of the image that operators alert on.
#[derive(Debug, Default, PartialEq, Eq)]
struct Health {
    brokers: usize,
    unfenced: usize,
    fenced: usize,
    shutting_down: usize,
    topics: usize,
    partitions: usize,
    offline: usize,
    under_replicated: usize,
    under_min_isr: usize,
    not_preferred: usize,
}

impl Health {
    fn of(img: &MetadataImage) -> Self {
        let mut h = Self {
            brokers: img.brokers.len(),
            unfenced: img.brokers.values().filter(|b| !b.fenced).count(),
            fenced: img.brokers.values().filter(|b| b.fenced).count(),
            shutting_down: img.brokers.values().filter(|b| b.shutting_down).count(),
            topics: img.topics.len(),
            ..Self::default()
        };
        for t in img.topics.values() {
            let min_isr = t
                .configs
                .get("min.insync.replicas")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1);
            for p in &t.partitions {
                h.partitions += 1;
                h.offline += usize::from(p.leader.is_none());
                h.under_replicated += usize::from(p.isr.len() < p.replicas.len());
                h.under_min_isr += usize::from(p.isr.len() < min_isr);
                h.not_preferred +=
                    usize::from(p.leader.is_some() && p.leader != p.replicas.first().copied());
            }
        }
        h
    }
}

/// The `# HELP` text of the broker's gauges (once per process).
fn describe_metrics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (name, help) in [
            ("broker_consensus_term", "the node's current consensus term"),
            ("broker_consensus_commit_index", "the node's commit index"),
            (
                "broker_consensus_applied_index",
                "the last index applied to the metadata image",
            ),
            (
                "broker_consensus_is_leader",
                "1 when this node is the consensus leader",
            ),
            (
                "broker_consensus_snapshot_index",
                "the index of the node's latest snapshot",
            ),
            ("broker_registered_brokers", "registered brokers"),
            ("broker_unfenced_brokers", "brokers not fenced"),
            (
                "broker_fenced_brokers",
                "fenced brokers (session expired or never caught up)",
            ),
            (
                "broker_shutting_down_brokers",
                "brokers in controlled shutdown",
            ),
            ("broker_topics", "topics"),
            ("broker_partitions", "partitions of all topics"),
            ("broker_offline_partitions", "partitions without a leader"),
            (
                "broker_under_replicated_partitions",
                "partitions whose ISR is smaller than their replica set",
            ),
            (
                "broker_under_min_isr_partitions",
                "partitions whose ISR is smaller than the topic's min.insync.replicas",
            ),
            (
                "broker_preferred_leader_imbalance",
                "partitions led by a replica other than their first (see topics elect-leaders)",
            ),
        ] {
            metrics::describe_gauge!(name, help);
        }
    });
}

async fn render_metrics(State(app): State<App>) -> Response {
    describe_metrics();
    let st = app.ctl.node().status();
    let id = st.id.to_string();
    metrics::gauge!("broker_consensus_term", "node" => id.clone()).set(st.term as f64);
    metrics::gauge!("broker_consensus_commit_index", "node" => id.clone())
        .set(st.commit_index as f64);
    metrics::gauge!("broker_consensus_applied_index", "node" => id.clone())
        .set(st.applied_index as f64);
    metrics::gauge!("broker_consensus_is_leader", "node" => id.clone()).set(if st.is_leader() {
        1.0
    } else {
        0.0
    });
    metrics::gauge!("broker_consensus_snapshot_index", "node" => id.clone())
        .set(st.snapshot_index as f64);
    for t in app.ctl.node().snapshot_transfers() {
        let direction = match t.direction {
            consensus_api::TransferDirection::Sending => "sending",
            consensus_api::TransferDirection::Receiving => "receiving",
        };
        let labels = [
            ("node", id.clone()),
            ("peer", t.peer.to_string()),
            ("direction", direction.to_string()),
        ];
        metrics::gauge!("broker_consensus_snapshot_transfer_bytes", &labels).set(t.bytes as f64);
        metrics::gauge!("broker_consensus_snapshot_transfer_total_bytes", &labels)
            .set(t.total_bytes as f64);
        metrics::gauge!("broker_consensus_snapshot_transfer_chunks", &labels).set(t.chunks as f64);
        metrics::gauge!(
            "broker_consensus_snapshot_transfer_elapsed_seconds",
            &labels
        )
        .set(t.elapsed_ms as f64 / 1000.0);
        metrics::gauge!("broker_consensus_snapshot_transfer_in_flight", &labels).set(if t.done {
            0.0
        } else {
            1.0
        });
        metrics::gauge!("broker_consensus_snapshot_transfer_failed", &labels)
            .set(if t.error.is_some() { 1.0 } else { 0.0 });
    }
    let h = app.ctl.node().read_local(|m| Health::of(m.image()));
    metrics::gauge!("broker_registered_brokers", "node" => id.clone()).set(h.brokers as f64);
    metrics::gauge!("broker_unfenced_brokers", "node" => id.clone()).set(h.unfenced as f64);
    metrics::gauge!("broker_fenced_brokers", "node" => id.clone()).set(h.fenced as f64);
    metrics::gauge!("broker_shutting_down_brokers", "node" => id.clone())
        .set(h.shutting_down as f64);
    metrics::gauge!("broker_topics", "node" => id.clone()).set(h.topics as f64);
    metrics::gauge!("broker_partitions", "node" => id.clone()).set(h.partitions as f64);
    metrics::gauge!("broker_offline_partitions", "node" => id.clone()).set(h.offline as f64);
    metrics::gauge!("broker_under_replicated_partitions", "node" => id.clone())
        .set(h.under_replicated as f64);
    metrics::gauge!("broker_under_min_isr_partitions", "node" => id.clone())
        .set(h.under_min_isr as f64);
    metrics::gauge!("broker_preferred_leader_imbalance", "node" => id).set(h.not_preferred as f64);
    match &app.metrics {
        Some(h) => ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verified_client_certificate_is_a_credential_only_where_configured() {
        let post = Method::POST;
        let none = HeaderMap::new();
        let mut bearer = HeaderMap::new();
        bearer.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef-token".parse().expect("header"),
        );
        let status = |r: Result<(), ApiError>| r.err().map(|e| e.status.as_u16());
        let certs = AdminAuth::client_certificates(false);
        assert_eq!(status(certs.check(&post, "/topics", &none, true)), None);
        assert_eq!(
            status(certs.check(&post, "/topics", &none, false)),
            Some(401)
        );
        // A token where none is configured is no credential.
        assert_eq!(
            status(certs.check(&post, "/topics", &bearer, false)),
            Some(403)
        );
        let token = AdminAuth::token("0123456789abcdef-token", false).expect("token");
        assert_eq!(
            status(token.check(&post, "/topics", &none, true)),
            Some(401)
        );
        assert_eq!(status(token.check(&post, "/topics", &bearer, false)), None);
        let both = token.or_client_certificates();
        assert_eq!(status(both.check(&post, "/topics", &none, true)), None);
        assert_eq!(status(both.check(&post, "/topics", &bearer, false)), None);
        // With a broker token, the broker RPCs take only it: not a certificate.
        let split = both
            .with_broker_token("fedcba9876543210-broker")
            .expect("broker token");
        let rpc = "/broker-rpc/register";
        assert_eq!(status(split.check(&post, rpc, &none, true)), Some(401));
        assert_eq!(status(split.check(&post, "/topics", &none, true)), None);
    }

    #[test]
    fn learner_addresses_must_be_dialable() {
        for good in [
            "127.0.0.1:7001",
            "node-4.example:7001",
            "[::1]:7001",
            "h_1:1",
        ] {
            assert!(check_address(good).is_ok(), "{good}");
        }
        for bad in [
            "0",
            "host",
            "host:0",
            "host:00000",
            "host:65536",
            ":7001",
            "a b:1",
            "[::1:7001",
            "[x]:1",
            "h/1:1",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    /// The routes `router` serves, with their methods, as `METHOD /path`.
    const ROUTES: &[&str] = &[
        "get /cluster/status",
        "get /cluster/quorum",
        "get /cluster/backup",
        "post /cluster/learners",
        "put /cluster/voters",
        "delete /cluster/members/{id}",
        "post /cluster/leader",
        "get /brokers",
        "post /brokers/{id}/cancel-shutdown",
        "post /broker-rpc/register",
        "post /broker-rpc/{id}/heartbeat",
        "post /broker-rpc/{id}/shutdown",
        "get /topics",
        "post /topics",
        "get /topics/{name}",
        "delete /topics/{name}",
        "get /brokers/{id}",
        "delete /brokers/{id}",
        "post /topics/{name}/partitions",
        "post /topics/{name}/configs",
        "get /topic-configs",
        "post /elections/preferred",
        "get /metadata/changes",
        "get /metrics",
        "get /openapi.json",
    ];

    #[test]
    fn health_counts_what_operators_alert_on() {
        let mut img = MetadataImage::default();
        let p = |leader: Option<BrokerId>, isr: &[BrokerId]| PartitionState {
            replicas: vec![1, 2, 3],
            isr: isr.to_vec(),
            leader,
            leader_epoch: 0,
            partition_epoch: 0,
        };
        img.topics.insert(
            "t".into(),
            Topic {
                id: 1,
                name: "t".into(),
                partitions: vec![p(Some(1), &[1, 2, 3]), p(Some(2), &[2]), p(None, &[3])],
                configs: [("min.insync.replicas".to_string(), "2".to_string())].into(),
            },
        );
        let h = Health::of(&img);
        assert_eq!(
            (
                h.partitions,
                h.offline,
                h.under_replicated,
                h.under_min_isr,
                h.not_preferred
            ),
            (3, 1, 2, 2, 1)
        );
    }

    #[test]
    fn the_openapi_description_lists_exactly_the_served_routes() {
        let router = include_str!("admin.rs");
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        let mut described = Vec::new();
        for (path, ops) in spec["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                described.push(format!("{method} {path}"));
            }
        }
        described.sort();
        let mut served: Vec<String> = ROUTES.iter().map(|r| r.to_string()).collect();
        served.sort();
        assert_eq!(described, served);
        for r in ROUTES {
            let path = r.split_once(' ').map(|(_, p)| p).unwrap_or(r);
            assert!(
                router.contains(&format!(".route(\"{path}\"")),
                "{path} is not routed"
            );
        }
        // Every write is marked as needing the token.
        for (path, ops) in spec["paths"].as_object().expect("paths") {
            for (method, op) in ops.as_object().expect("operations") {
                if method != "get" || path == BACKUP_PATH {
                    assert!(op.get("security").is_some(), "{method} {path}: no security");
                }
            }
        }
    }
}
