//! The placement service's generated code (`proto/cleanroom/worker/v1`).

// Generated code follows prost's and tonic's conventions, not our lint set.
#![allow(
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::clone_on_ref_ptr
)]

tonic::include_proto!("cleanroom.worker.v1");
