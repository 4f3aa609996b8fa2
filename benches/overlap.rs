//! Overlap (people matching) throughput on generated fingerprints.
//!
//! ```text
//! cargo bench --bench overlap                      # 1M x 1M rows
//! cargo bench --bench overlap -- --rows 10000000   # 10M x 10M
//! cargo bench --bench overlap -- --shared-prefix 1 # every email shares 8 bytes
//! ```
//!
//! Each side has an email fingerprint on every row and a phone fingerprint
//! on 70% of rows; 30% of the first side's people are in the second. Times
//! the matching itself (the data is already decrypted in memory).

mod common;

use common::{arg, fingerprint};

use std::sync::Arc;
use std::time::Instant;

use arrow::array::FixedSizeBinaryBuilder;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use cleanroom::psi::{Side, match_people};

/// Batches of 65,536 rows for people `ids`; with `shared_prefix`, every
/// email fingerprint starts with the same 8 bytes (a partner flooding the
/// matcher's index).
fn side(ids: impl Iterator<Item = u64>, shared_prefix: bool) -> Vec<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("email", DataType::FixedSizeBinary(32), true),
        Field::new("phone", DataType::FixedSizeBinary(32), true),
    ]));
    let mut out = Vec::new();
    let mut email = FixedSizeBinaryBuilder::new(32);
    let mut phone = FixedSizeBinaryBuilder::new(32);
    let mut n = 0;
    let mut flush = |email: &mut FixedSizeBinaryBuilder, phone: &mut FixedSizeBinaryBuilder| {
        out.push(
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(email.finish()), Arc::new(phone.finish())],
            )
            .expect("valid batch"),
        );
    };
    for id in ids {
        let mut fp = fingerprint(id, 0);
        if shared_prefix {
            fp[..8].copy_from_slice(b"flooding");
        }
        email.append_value(fp).expect("32 bytes");
        if id % 10 < 7 {
            phone.append_value(fingerprint(id, 1)).expect("32 bytes");
        } else {
            phone.append_null();
        }
        n += 1;
        if n % 65_536 == 0 {
            flush(&mut email, &mut phone);
        }
    }
    if n % 65_536 != 0 {
        flush(&mut email, &mut phone);
    }
    out
}

fn main() {
    let rows = arg("--rows", 1_000_000);
    let shared = rows * 3 / 10;
    let t = Instant::now();
    let flood = arg("--shared-prefix", 0) == 1;
    let a = side(0..rows, flood);
    let b = side((0..shared).chain(rows..2 * rows - shared), flood);
    println!(
        "generated {rows} x {rows} rows in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let ids: &[(&str, &str)] = &[("email", "email"), ("phone", "phone")];
    for run in 1..=3 {
        let t = Instant::now();
        let m = match_people(
            Side {
                batches: &a,
                identifiers: ids,
            },
            Side {
                batches: &b,
                identifiers: ids,
            },
        );
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(
            m.overlap, shared,
            "the overlap must equal the generated truth"
        );
        println!(
            "run {run}: overlap {} of {rows} x {rows} in {secs:.2} s ({:.1} M rows/s)",
            m.overlap,
            2.0 * rows as f64 / secs / 1e6
        );
    }
}
