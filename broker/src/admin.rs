//! The HTTP/JSON admin API every node serves (axum), and `/metrics` in Prometheus text format.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /cluster/status` | this node's consensus status |
//! | `GET /brokers` | registered brokers |
//! | `POST /brokers` | register `{broker_id, incarnation, endpoints, rack}`: the epoch |
//! | `POST /brokers/{id}/heartbeat` | `{epoch, metadata_offset}` |
//! | `POST /brokers/{id}/shutdown` | `{epoch}`: controlled shutdown |
//! | `GET /topics`, `GET /topics/{name}` | topics with partitions, leaders, ISRs |
//! | `POST /topics` | create `{name, partitions, replication_factor, configs}` |
//! | `DELETE /topics/{name}` | delete |
//! | `GET /metadata/changes?since=N&max=M&wait_ms=W` | the feed, long-polling up to `W` ms |
//! | `GET /metrics` | Prometheus text |
//!
//! Errors are JSON `{"error": kind, "reason": text}` with a 4xx status for bad requests (unknown
//! topic or broker 404, duplicate or stale epoch 409, invalid 400, malformed JSON 400) and 5xx
//! when consensus is unavailable (503 with the leader hint, 504 on timeout). A refused request
//! changed nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use consensus_api::ConsensusError;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};

use crate::controller::{Controller, ControllerError};
use crate::model::*;

#[derive(Clone)]
struct App {
    ctl: Controller,
    metrics: Option<PrometheusHandle>,
}

/// The admin router of one node.
pub fn router(ctl: Controller, metrics: Option<PrometheusHandle>) -> Router {
    Router::new()
        .route("/cluster/status", get(cluster_status))
        .route("/brokers", get(list_brokers).post(register))
        .route("/brokers/{id}/heartbeat", post(heartbeat))
        .route("/brokers/{id}/shutdown", post(shutdown))
        .route("/topics", get(list_topics).post(create_topic))
        .route("/topics/{name}", get(describe_topic).delete(delete_topic))
        .route("/metadata/changes", get(changes))
        .route("/metrics", get(render_metrics))
        .with_state(App { ctl, metrics })
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
                ConsensusError::InvalidRequest(_) => {
                    api(StatusCode::BAD_REQUEST, "invalid", reason)
                }
                _ => api(StatusCode::INTERNAL_SERVER_ERROR, "internal", reason),
            },
        }
    }
}

fn body<T>(r: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    r.map(|Json(v)| v)
        .map_err(|e| api(StatusCode::BAD_REQUEST, "malformed", e.body_text()))
}

async fn cluster_status(State(app): State<App>) -> Json<consensus_api::Status> {
    Json(app.ctl.node().status())
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
    Path(id): Path<BrokerId>,
    req: Result<Json<HeartbeatReq>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
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
    Path(id): Path<BrokerId>,
    req: Result<Json<EpochReq>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let r = body(req)?;
    app.ctl
        .submit(MetadataCommand::BeginControlledShutdown {
            broker_id: id,
            epoch: r.epoch,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_topics(State(app): State<App>) -> Result<Json<Vec<Topic>>, ApiError> {
    let img = app.ctl.image().await?;
    Ok(Json(img.topics.into_values().collect()))
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
    Path(name): Path<String>,
) -> Result<Json<Topic>, ApiError> {
    let img = app.ctl.image().await?;
    img.topics
        .get(&name)
        .cloned()
        .map(Json)
        .ok_or_else(|| ControllerError::Metadata(MetadataError::UnknownTopic(name)).into())
}

async fn delete_topic(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    app.ctl
        .submit(MetadataCommand::DeleteTopic { name })
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
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(30_000));
    let max = q.max.unwrap_or(1000).clamp(1, 10_000);
    Ok(Json(app.ctl.changes_since(q.since, max, wait).await?))
}

async fn render_metrics(State(app): State<App>) -> Response {
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
    let (brokers, unfenced, topics, partitions) = app.ctl.node().read_local(|m| {
        let img = m.image();
        (
            img.brokers.len(),
            img.brokers.values().filter(|b| !b.fenced).count(),
            img.topics.len(),
            img.topics
                .values()
                .map(|t| t.partitions.len())
                .sum::<usize>(),
        )
    });
    metrics::gauge!("broker_registered_brokers", "node" => id.clone()).set(brokers as f64);
    metrics::gauge!("broker_unfenced_brokers", "node" => id.clone()).set(unfenced as f64);
    metrics::gauge!("broker_topics", "node" => id.clone()).set(topics as f64);
    metrics::gauge!("broker_partitions", "node" => id).set(partitions as f64);
    match &app.metrics {
        Some(h) => ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}
