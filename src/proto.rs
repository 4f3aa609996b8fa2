//! Generated protobuf and gRPC code for the public contract in `proto/`.

// Generated code follows prost's and tonic's conventions, not our lint set.
#![allow(
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::clone_on_ref_ptr
)]

tonic::include_proto!("cleanroom.v1");

/// Encoded descriptors of `cleanroom.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cleanroom_descriptor");

/// Encoded descriptors of the Arrow Flight service the same port serves
/// (Flight SQL), for reflection only.
pub const FLIGHT_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flight_descriptor");
