//! Open Inference Protocol (KServe v2 / Triton `inference.GRPCInferenceService`)
//! messages, client and server, generated at build time from `proto/`.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Generated messages and service stubs of package `inference`.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of the protocol, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("inference_descriptor");

pub use inference::grpc_inference_service_client::GrpcInferenceServiceClient;
pub use inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
