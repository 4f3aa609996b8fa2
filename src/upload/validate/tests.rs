use super::*;

/// A rebuilt column holds exactly the values and validity it was given,
/// zeros under its null slots (text: no bytes there) and nothing before
/// or after, for arrays sliced out of larger ones whose null slots and
/// edges hold other bytes; with and without nulls.
#[test]
fn a_rebuilt_column_holds_its_values_and_nothing_else() {
    use arrow::array::{ArrayRef, Date32Array, TimestampMicrosecondArray};
    use arrow::buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
    use std::sync::Arc;
    let mut seed = 11u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        seed >> 33
    };
    for case in 0..60 {
        let n = [0usize, 1, 7, 64, 300][case % 5];
        let total = n + 5;
        let with_nulls = case % 3 != 0;
        let valid: Vec<bool> = (0..total).map(|_| !with_nulls || next() % 4 != 0).collect();
        let nulls = || Some(NullBuffer::from(valid.clone()));
        let ints: Vec<i64> = (0..total).map(|_| next() as i64 - (1 << 30)).collect();
        let mut chars: Vec<u8> = Vec::new();
        let mut ends = vec![0i32];
        for _ in 0..total {
            let len = (next() % 9) as usize;
            chars.extend((0..len).map(|_| b'a' + (next() % 26) as u8));
            ends.push(chars.len() as i32);
        }
        let fixed: Vec<u8> = (0..total * 32).map(|_| next() as u8).collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::new(ScalarBuffer::from(ints.clone()), nulls())),
            Arc::new(Float64Array::new(
                ints.iter().map(|v| *v as f64 / 3.0).collect(),
                nulls(),
            )),
            Arc::new(Date32Array::new(
                ints.iter().map(|v| *v as i32).collect(),
                nulls(),
            )),
            Arc::new(TimestampMicrosecondArray::new(
                ScalarBuffer::from(ints.clone()),
                nulls(),
            )),
            Arc::new(
                StringArray::try_new(
                    OffsetBuffer::new(ScalarBuffer::from(ends.clone())),
                    Buffer::from_vec(chars.clone()),
                    nulls(),
                )
                .unwrap(),
            ),
            Arc::new(
                FixedSizeBinaryArray::try_new(32, Buffer::from_vec(fixed.clone()), nulls())
                    .unwrap(),
            ),
        ];
        for whole in columns {
            let col = whole.slice(2, n);
            let out = rebuild(col.as_ref()).unwrap();
            assert_eq!(out.data_type(), col.data_type());
            assert_eq!(out.len(), n);
            assert_eq!(out.offset(), 0);
            for i in 0..n {
                assert_eq!(out.is_valid(i), valid[i + 2], "case {case} row {i}");
            }
            let data = out.to_data();
            match col.data_type() {
                DataType::Utf8 => {
                    let (a, b) = (col.as_string::<i32>(), out.as_string::<i32>());
                    let mut bytes = 0;
                    for i in 0..n {
                        if valid[i + 2] {
                            assert_eq!(a.value(i), b.value(i));
                            bytes += a.value(i).len();
                        } else {
                            assert_eq!(b.value(i), "");
                        }
                    }
                    assert_eq!(b.value_offsets()[0], 0);
                    assert_eq!(b.value_data().len(), bytes);
                }
                DataType::FixedSizeBinary(_) => {
                    let b = out.as_fixed_size_binary();
                    assert_eq!(b.value_data().len(), n * 32);
                    for i in 0..n {
                        let expected: &[u8] = if valid[i + 2] {
                            &fixed[(i + 2) * 32..(i + 3) * 32]
                        } else {
                            &[0; 32]
                        };
                        assert_eq!(b.value(i), expected);
                    }
                }
                _ => {
                    // Primitive values: 4 or 8 bytes each, zero under nulls.
                    let width = data.buffers()[0].len() / n.max(1);
                    let before = col.to_data();
                    for i in 0..n {
                        let got = &data.buffers()[0].as_slice()[i * width..(i + 1) * width];
                        let given = &before.buffers()[0].as_slice()
                            [(before.offset() + i) * width..(before.offset() + i + 1) * width];
                        if valid[i + 2] {
                            assert_eq!(got, given);
                        } else {
                            assert!(got.iter().all(|b| *b == 0));
                        }
                    }
                    assert_eq!(data.buffers()[0].len(), n * width);
                }
            }
        }
    }
}

/// The sketch never counts a value short (so a value past the cap is
/// always caught), and 300,000 distinct values (a fifth in a second
/// column), with one repeated 1,001 times, push no other value's
/// estimate anywhere near the cap.
#[test]
fn the_repeat_sketch_never_counts_short_nor_far_long() {
    let mut sketch = RepeatCounter::new();
    let value = |n: u64| *blake3::hash(&n.to_le_bytes()).as_bytes();
    let mut worst = 0u16;
    for n in 0..300_000u64 {
        let column = usize::from(n % 5 == 0);
        let estimate = sketch.add(column, &value(n));
        assert!(estimate >= 1);
        worst = worst.max(estimate);
    }
    let repeated = value(7);
    for count in 2..=1_001u16 {
        assert!(sketch.add(0, &repeated) >= count);
    }
    // The same bytes in the other column are another value.
    assert!(sketch.add(1, &repeated) < 100);
    assert!(worst < 20, "a distinct value was estimated at {worst} rows");
    // Short values (not 32 bytes) are folded too.
    for count in 1..=5u16 {
        assert!(sketch.add(0, b"short") >= count);
    }
}

/// A batch counted at once leaves the same counters, and gives the same
/// highest estimate, as its values counted one by one; nulls count
/// nothing.
#[test]
fn a_batch_counts_as_its_values_one_by_one() {
    let mut at_once = RepeatCounter::new();
    let mut one_by_one = at_once.clone();
    let value = |n: u64| *blake3::hash(&(n % 700).to_le_bytes()).as_bytes();
    let values: Vec<Option<[u8; 32]>> = (0..5_000u64)
        .map(|n| (n % 11 != 0).then(|| value(n)))
        .collect();
    let batch =
        FixedSizeBinaryArray::try_from_sparse_iter_with_size(values.iter().copied(), 32).unwrap();
    for column in [0, 1] {
        let highest = at_once.add_all(column, &batch);
        let mut expected = 0;
        for v in values.iter().flatten() {
            expected = expected.max(one_by_one.add(column, v));
        }
        assert_eq!(highest, expected);
        assert!(highest >= 6, "{highest}");
    }
    assert!(
        at_once
            .blocks
            .iter()
            .zip(&one_by_one.blocks)
            .all(|(a, b)| a.0 == b.0)
    );
    assert_eq!(RepeatCounter::new().add_all(0, &batch.slice(0, 0)), 0);
}

/// At the size the sketch is made for (20M distinct values in one
/// upload) no distinct value comes near the default cap of 1,000 (the
/// worst estimate was 55 when this was written).
#[test]
fn twenty_million_distinct_values_stay_far_below_the_cap() {
    let mut sketch = RepeatCounter::new();
    let mut worst = 0u16;
    let mut value = [0u8; 32];
    for n in 0..20_000_000u64 {
        value[..8].copy_from_slice(&n.to_le_bytes());
        value[8..16].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        worst = worst.max(sketch.add(0, &value));
    }
    assert!(
        worst < 250,
        "a distinct value was estimated at {worst} rows"
    );
}

/// A dataset with a date and a timestamp metric, as a policy declares them.
fn temporal_dataset() -> Dataset {
    let policy = crate::policy::unit_policy(
        r#"
[[dataset]]
name = "visits"
owner = "acme"

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[[dataset.column]]
name = "day"
role = "metric"
type = "date"
min = 2026-01-01
max = 2026-12-31

[[dataset.column]]
name = "at"
role = "metric"
type = "timestamp"
min = 2026-01-01T00:00:00Z
max = 2026-01-01T12:00:00+02:00

[[dataset]]
name = "other"
owner = "globex"

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[query]
aggregates = ["count"]
min_group_size = 5
"#,
    );
    policy.dataset("visits").unwrap().clone()
}

#[test]
fn dates_and_timestamps_are_checked_against_their_bounds() {
    use arrow::array::{Date32Array, FixedSizeBinaryArray, TimestampMicrosecondArray};
    let dataset = temporal_dataset();
    let batch = |day: i32, at: i64| {
        RecordBatch::try_new(
            upload_schema(&dataset),
            vec![
                std::sync::Arc::new(
                    FixedSizeBinaryArray::try_from_iter([[7u8; 32]].into_iter()).unwrap(),
                ),
                std::sync::Arc::new(Date32Array::from(vec![day])),
                std::sync::Arc::new(TimestampMicrosecondArray::from(vec![at])),
            ],
        )
        .unwrap()
    };
    // 2026-01-01 is day 20454; the upper bound is 10:00 UTC.
    let (first, last) = (20_454, 20_454 + 364);
    let start = 20_454i64 * 86_400_000_000;
    let ten = start + 10 * 3_600_000_000;
    for (day, at, ok) in [
        (first, start, true),
        (last, ten, true),
        (first - 1, start, false),
        (last + 1, start, false),
        (first, start - 1, false),
        (first, ten + 1, false),
    ] {
        let mut v = Validator::new(&dataset, Limits::default());
        let got = v.check(&batch(day, at), 0);
        assert_eq!(got.is_ok(), ok, "{day} {at}: {got:?}");
        if let Err(r) = got {
            assert_eq!(r.rule, "metric.bounds");
            assert!(!r.detail.contains(&day.to_string()), "{}", r.detail);
        }
    }
}

#[test]
fn identifier_heuristics() {
    assert!(looks_like_identifier("jane@example.com"));
    assert!(looks_like_identifier("+1 (415) 555-0132"));
    assert!(!looks_like_identifier("north"));
    assert!(!looks_like_identifier("18-24"));
    assert!(looks_like_text(b"jane.saoirse@example.com........"));
    assert!(!looks_like_text(&[0u8; 32]));
}
