//! The store's client API over the network: `proto/kv.proto` served with gRPC (tonic, HTTP/2)
//! over mutual TLS with the cluster's CA, on any node (a follower forwards puts to the leader,
//! reads are linearizable). [`Client`] is its client; the bench drives it from its own process
//! the way etcd's clients drive etcd.

use std::net::SocketAddr;
use std::time::Duration;

use consensus_api::{Consensus, ConsensusError, NodeId, TlsConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::{Command, Store};

/// The generated messages and service of `proto/kv.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    tonic::include_proto!("kvstore");
}

/// The generated client of etcd's `KV.Put` (`proto/etcd.proto`), for side-by-side runs.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// Largest request or answer the API takes: a put's key and value together stay well under the
/// consensus layer's command limit.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

struct KvService {
    node: Consensus<Store>,
}

/// The command of a put request: `Put` (answers the previous value) when it asks for the
/// previous value, else `Set`.
fn put_command(r: pb::PutRequest) -> Command {
    let pb::PutRequest {
        key,
        value,
        prev_kv,
    } = r;
    if prev_kv {
        Command::Put { key, value }
    } else {
        Command::Set { key, value }
    }
}

/// A consensus error as a gRPC status a client can act on.
fn status(e: ConsensusError) -> Status {
    use consensus_api::ErrorKind as K;
    let msg = e.to_string();
    match e.kind() {
        K::NotLeader | K::ShuttingDown | K::Transport => Status::unavailable(msg),
        K::Timeout => Status::deadline_exceeded(msg),
        K::InvalidRequest => Status::invalid_argument(msg),
        _ => Status::internal(msg),
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let previous = self
            .node
            .propose(put_command(request.into_inner()))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PutResponse { previous }))
    }

    type PutStreamStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::PutResponse, Status>> + Send + 'static>,
    >;

    async fn put_stream(
        &self,
        request: Request<tonic::Streaming<pb::PutRequest>>,
    ) -> Result<Response<Self::PutStreamStream>, Status> {
        let mut requests = request.into_inner();
        let node = self.node.clone();
        // One put at a time per stream, answered in order; the first failure ends the stream.
        let answers = async_stream_of(move |tx| async move {
            while let Some(req) = requests.message().await.transpose() {
                let answer = match req {
                    Ok(req) => node
                        .propose(put_command(req))
                        .await
                        .map(|previous| pb::PutResponse { previous })
                        .map_err(status),
                    Err(e) => Err(e),
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let key = request.into_inner().key;
        let value = self
            .node
            .read(|s| s.get(&key).map(str::to_string))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetResponse { value }))
    }
}

/// The stream of what `produce` sends on its channel (bounded: a slow reader holds it back).
fn async_stream_of<T, F, Fut>(produce: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(produce(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The PEM files of a client of the API as `tls` names them: the development operator
/// certificate (`DevCerts`) or those files (`Files`).
fn client_paths(tls: &TlsConfig) -> Result<consensus_tls::DevPaths, String> {
    match tls {
        TlsConfig::DevCerts { dir } => consensus_tls::dev::ensure_operator(dir),
        TlsConfig::Files { .. } => consensus_tls::paths(tls, 0),
        other => Err(format!(
            "the client API always uses mutual TLS; {other:?} gives it no certificates"
        )),
    }
}

/// A running client API server; dropping it stops it.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves `node`'s store on `listen` (port 0 for any) with node `id`'s certificate from
    /// `tls`; clients must present a certificate of the same CA.
    pub async fn start(
        node: Consensus<Store>,
        id: NodeId,
        listen: SocketAddr,
        tls: &TlsConfig,
    ) -> Result<Self, String> {
        let consensus_tls::PemBytes { ca, cert, key } =
            consensus_tls::read_pem(&consensus_tls::paths(tls, id)?)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("bind {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        // Answers that are ready together leave in one write ([`crate::gather`]).
        let incoming = tokio_stream::StreamExt::map(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            |accepted| accepted.map(crate::gather::Gathered::new),
        );
        let service = pb::kv_server::KvServer::new(KvService { node })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let router = tonic::transport::Server::builder()
            .tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(cert, key))
                    .client_ca_root(Certificate::from_pem(ca)),
            )
            .map_err(|e| format!("TLS server config: {e}"))?
            .add_service(service);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stopped = async {
                let _ = stopped.await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped).await {
                tracing::warn!(%addr, "client API stopped: {e}");
            }
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// A client of the API: one HTTP/2 connection (clone it to share the connection).
#[derive(Clone)]
pub struct Client {
    inner: pb::kv_client::KvClient<Channel>,
}

impl Client {
    /// Connects to node `server` at `addr`, presenting the client certificate `tls` names
    /// (`DevCerts`: the development operator certificate; `Files`: those files).
    pub async fn connect(
        addr: SocketAddr,
        server: NodeId,
        tls: &TlsConfig,
        timeout: Duration,
    ) -> Result<Self, String> {
        let paths = client_paths(tls)?;
        let material =
            consensus_tls::load_files(&paths.ca_cert, &paths.node_cert, &paths.node_key)?;
        let config = consensus_tls::client_config(&material, H2_ALPN)?;
        let channel = tls_channel(addr, &consensus_tls::node_name(server), config, timeout).await?;
        Ok(Self {
            // The server enforces the request limit (and says so); the client bounds answers.
            inner: pb::kv_client::KvClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// Puts `value` under `key`; the previous value.
    pub async fn put(&mut self, key: String, value: String) -> Result<Option<String>, Status> {
        let r = self.inner.put(put_request(key, value, true)).await?;
        Ok(r.into_inner().previous)
    }

    /// Puts `value` under `key` without asking for the previous value (etcd's put without
    /// `prev_kv`).
    pub async fn set(&mut self, key: String, value: String) -> Result<(), Status> {
        self.inner.put(put_request(key, value, false)).await?;
        Ok(())
    }

    /// Opens a put stream ([`PutStream`]) on this client's connection.
    pub async fn put_stream(&mut self) -> Result<PutStream, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let answers = self
            .inner
            .put_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(PutStream { tx, answers })
    }

    /// The value of `key`, read linearizably.
    pub async fn get(&mut self, key: String) -> Result<Option<String>, Status> {
        let r = self.inner.get(pb::GetRequest { key }).await?;
        Ok(r.into_inner().value)
    }
}

/// One put stream of a [`Client`]: puts answered in order on a long-lived gRPC stream, without
/// a new HTTP/2 stream (headers, trailers) per put.
pub struct PutStream {
    tx: tokio::sync::mpsc::Sender<pb::PutRequest>,
    answers: tonic::Streaming<pb::PutResponse>,
}

impl PutStream {
    /// Puts `value` under `key` and waits for its answer: the previous value if `prev_kv`.
    /// After an error the stream is over; open another.
    pub async fn put(
        &mut self,
        key: String,
        value: String,
        prev_kv: bool,
    ) -> Result<Option<String>, Status> {
        self.tx
            .send(put_request(key, value, prev_kv))
            .await
            .map_err(|_| Status::unavailable("the put stream is closed"))?;
        match self.answers.message().await? {
            Some(r) => Ok(r.previous),
            None => Err(Status::unavailable("the server ended the put stream")),
        }
    }
}

/// The ALPN protocol of gRPC over TLS.
pub const H2_ALPN: &[u8] = b"h2";

/// A gRPC channel to `addr` over TLS with `config`, expecting the server certificate to name
/// `server_name`; `timeout` bounds the connection attempt and every call.
///
/// The TLS stream is set up here rather than by tonic so that it can sit on
/// [`Gathered`](crate::gather::Gathered) (the requests of many callers that are ready together
/// leave in one write) and under [`Unvectored`](crate::gather::Unvectored) (h2 hands them over
/// in one TLS record). The channel's URI says `http://` only because tonic is not asked to do
/// the TLS itself.
pub async fn tls_channel(
    addr: SocketAddr,
    server_name: &str,
    config: rustls::ClientConfig,
    timeout: Duration,
) -> Result<Channel, String> {
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("TLS server name {server_name:?}: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let connect = tower::service_fn(move |_: tonic::transport::Uri| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tls = connector.connect(name, gathered_tcp(addr).await?).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(crate::gather::Unvectored(tls)))
        }
    });
    channel_with(addr, timeout, connect).await
}

/// A plaintext gRPC channel to `addr` with the same write gathering as [`tls_channel`], for
/// servers that are run without TLS (side-by-side runs against a plaintext etcd).
pub async fn plaintext_channel(addr: SocketAddr, timeout: Duration) -> Result<Channel, String> {
    let connect = tower::service_fn(move |_: tonic::transport::Uri| async move {
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(crate::gather::Unvectored(
            gathered_tcp(addr).await?,
        )))
    });
    channel_with(addr, timeout, connect).await
}

async fn gathered_tcp(
    addr: SocketAddr,
) -> std::io::Result<crate::gather::Gathered<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(crate::gather::Gathered::new(tcp))
}

async fn channel_with<C, Io>(
    addr: SocketAddr,
    timeout: Duration,
    connect: C,
) -> Result<Channel, String>
where
    C: tower::Service<tonic::transport::Uri, Response = Io, Error = std::io::Error>
        + Send
        + 'static,
    C::Future: Send,
    Io: hyper::rt::Read + hyper::rt::Write + Send + Unpin,
{
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(connect)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))
}

fn put_request(key: String, value: String, prev_kv: bool) -> pb::PutRequest {
    pb::PutRequest {
        key,
        value,
        prev_kv,
    }
}
