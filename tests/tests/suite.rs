//! The conformance suite for every combination enabled by this crate's features.
//! Adding a combination is one line.

#[cfg(all(feature = "openraft", feature = "grpc"))]
conformance::conformance_suite!(
    openraft_grpc,
    conformance::Combo::new(
        backend_openraft::OpenraftBackend,
        transport_grpc::GrpcTransportFactory
    )
);

#[cfg(all(feature = "tikv", feature = "grpc"))]
conformance::conformance_suite!(
    tikv_grpc,
    conformance::Combo::new(
        backend_tikv::TikvBackend,
        transport_grpc::GrpcTransportFactory
    )
);

#[cfg(all(feature = "openraft", feature = "quic"))]
conformance::conformance_suite!(
    openraft_quic,
    conformance::Combo::new(
        backend_openraft::OpenraftBackend,
        transport_quic::QuicTransportFactory
    )
);

#[cfg(all(feature = "tikv", feature = "quic"))]
conformance::conformance_suite!(
    tikv_quic,
    conformance::Combo::new(
        backend_tikv::TikvBackend,
        transport_quic::QuicTransportFactory
    )
);

#[cfg(feature = "grpc")]
conformance::transport_suite!(grpc_transport, transport_grpc::GrpcTransportFactory);

#[cfg(feature = "quic")]
conformance::transport_suite!(quic_transport, transport_quic::QuicTransportFactory);
