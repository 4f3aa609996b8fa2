//! Generated protobuf and gRPC code for the public contract in `proto/`.

#![allow(missing_docs, unreachable_pub, clippy::all, missing_debug_implementations)]

tonic::include_proto!("cleanroom.v1");

/// Encoded descriptors of `cleanroom.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cleanroom_descriptor");
