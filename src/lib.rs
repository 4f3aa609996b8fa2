//! Cleanroom: a self-hosted second-party data clean room.
//!
//! Partners upload keyed fingerprints of their customers plus the few
//! attribute columns their agreement allows; the server matches the sets and
//! answers aggregate-only SQL under the agreement's policy. See
//! `docs/policy.md` for the agreement format.

pub mod agreements;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod console;
pub mod crash;
pub mod disk;
pub mod identity;
pub mod names;
pub mod policy;
mod prefetch;
pub mod prepare;
pub mod privacy;
pub mod proto;
pub mod psi;
pub mod query;
pub mod room;
pub mod rules;
pub mod server;
pub mod storage;
pub mod synth;
pub mod upload;
