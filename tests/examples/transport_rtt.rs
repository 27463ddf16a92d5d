//! Round-trip latency of a small call over each compiled-in transport on loopback.
//!
//! `cargo run --release -p conformance --all-features --example transport_rtt [calls] [bytes]`
//! prints the median, p90 and p99 of `calls` sequential calls (default 5000) with a payload of
//! `bytes` (default 64), after a warm-up, for every transport, in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{InboundHandler, NodeConfig, NodeId, TransportFactory};

struct Echo;

#[async_trait]
impl InboundHandler for Echo {
    fn on_message(&self, _from: NodeId, _frame: Bytes) {}
    async fn on_call(&self, _from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        Ok(frame)
    }
}

fn factories() -> Vec<Arc<dyn TransportFactory>> {
    vec![
        #[cfg(feature = "grpc")]
        Arc::new(transport_grpc::GrpcTransportFactory),
        #[cfg(feature = "quic")]
        Arc::new(transport_quic::QuicTransportFactory),
    ]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let calls: usize = match args.next() {
        Some(a) => a.parse().map_err(|e| format!("calls: {e}"))?,
        None => 5000,
    };
    let bytes: usize = match args.next() {
        Some(a) => a.parse().map_err(|e| format!("bytes: {e}"))?,
        None => 64,
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let payload = Bytes::from(vec![7u8; bytes]);
    println!("transport  calls  bytes  p50_us  p90_us  p99_us");
    for factory in factories() {
        let tls = conformance::test_tls(dir.path());
        let mut a = NodeConfig::new(1, "rtt", dir.path());
        a.transport.tls = tls.clone();
        let mut b = NodeConfig::new(2, "rtt", dir.path());
        b.transport.tls = tls;
        let ta = factory.bind(&a).await.map_err(|e| e.to_string())?;
        let tb = factory.bind(&b).await.map_err(|e| e.to_string())?;
        tb.set_handler(Arc::new(Echo));
        ta.set_handler(Arc::new(Echo));
        ta.set_peer(2, tb.local_addr().to_string());
        let timeout = Duration::from_secs(5);
        for _ in 0..500 {
            ta.call(2, payload.clone(), timeout)
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            ta.call(2, payload.clone(), timeout)
                .await
                .map_err(|e| e.to_string())?;
            samples.push(t.elapsed());
        }
        samples.sort();
        println!(
            "{:<9}  {calls:>5}  {bytes:>5}  {:>6}  {:>6}  {:>6}",
            factory.name(),
            percentile(&samples, 0.5).as_micros(),
            percentile(&samples, 0.9).as_micros(),
            percentile(&samples, 0.99).as_micros()
        );
        ta.shutdown().await;
        tb.shutdown().await;
    }
    Ok(())
}
