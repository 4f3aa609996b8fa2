//! The public contract in `proto/`: generated protobuf and gRPC code, and
//! the wire form of the room's answers (`views`).

mod generated {
    // Generated code follows prost's and tonic's conventions, not our lint set.
    #![allow(
        unreachable_pub,
        missing_debug_implementations,
        clippy::all,
        clippy::clone_on_ref_ptr
    )]

    tonic::include_proto!("cleanroom.v1");
}

mod views;
mod words;

pub use generated::*;
pub use views::{agreement_view, blinding_chunks, summary};
pub use words::{dataset_state, rights, state, timestamp, when};

/// Encoded descriptors of `cleanroom.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cleanroom_descriptor");

/// Encoded descriptors of the Arrow Flight service the same port serves
/// (Flight SQL), for reflection only.
pub const FLIGHT_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flight_descriptor");

/// A gRPC code's canonical name, as status texts and metrics spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
