use super::*;
use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use std::collections::HashMap;

/// Tables read back from the store weigh what the tables they were
/// stored from weigh: columns decoded from one chunk share its buffer,
/// which must not count once per column (a 20M-row agreement once
/// weighed 10 GB that way and never stayed in an 8 GiB cache).
#[test]
fn stored_tables_weigh_what_their_values_take() {
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
name = "region"
role = "dimension"
max_cardinality = 10

[[dataset.column]]
name = "spend"
role = "metric"
type = "float"
min = 0
max = 100

[[dataset.column]]
name = "visits"
role = "metric"
type = "integer"
min = 0
max = 100

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
    let rows = 50_000usize;
    let schema = Arc::new(Schema::new(vec![
        Field::new("email", DataType::FixedSizeBinary(4), true),
        Field::new("region", DataType::Utf8, true),
        Field::new("spend", DataType::Float64, true),
        Field::new("visits", DataType::Int64, true),
    ]));
    let keys: Vec<[u8; 4]> = (0..rows as u32).map(u32::to_be_bytes).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(arrow::array::FixedSizeBinaryArray::try_from_iter(keys.into_iter()).unwrap()),
        Arc::new(StringArray::from_iter_values(
            (0..rows).map(|i| ["north", "south"][i % 2]),
        )),
        Arc::new(Float64Array::from_iter_values((0..rows).map(|i| i as f64))),
        Arc::new(Int64Array::from_iter_values((0..rows).map(|i| i as i64))),
    ];
    let batch = RecordBatch::try_new(schema, columns).unwrap();
    let table = TableData::new(
        policy.datasets()[0].clone(),
        vec![batch],
        (0..rows as u32).collect::<Vec<_>>().into(),
    );
    // Through the stored form and Arrow IPC, as the store reads it.
    let decoded: Vec<RecordBatch> = crate::query::matched_batches(&table)
        .unwrap()
        .iter()
        .flat_map(|b| {
            let ipc = crate::upload::encode_batch(b).unwrap();
            arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        })
        .collect();
    let back =
        crate::query::tables_from_matched(&policy, vec![("visits".to_string(), decoded)]).unwrap();
    let (before, after) = (held_bytes(&table), held_bytes(&back[0]));
    // 4 bytes of key, 5 + 4 of region, 8 of spend, 8 of visits, 4 + 4
    // of person numbers (across parties and the owner's own).
    assert!(
        before >= 37 * rows as u64 && before <= 40 * rows as u64,
        "{before}"
    );
    assert!(after <= before + 1024, "{after} against {before}");
}

/// A fingerprint of identity `kind` (0 or 1) for person-ish number `n`:
/// equal for equal (kind, n), never equal across kinds.
fn fp(kind: u8, n: u64) -> [u8; 32] {
    let mut out = [kind; 32];
    out[..8].copy_from_slice(&n.to_le_bytes());
    out
}

/// Reading and matching one identity kind at a time gives the tables a
/// plain computation gives: rows joined into people by label
/// propagation over shared (kind, fingerprint) pairs, keys equal exactly
/// where fingerprints of one kind are, and every other value as stored.
#[test]
fn tables_read_kind_by_kind_equal_a_plain_matching() {
    tables_read_kind_by_kind(true);
}

/// As above with a kind only one dataset has: the other's rows are
/// still numbered in that kind's pass.
#[test]
fn a_kind_of_one_dataset_only_is_read_alike() {
    tables_read_kind_by_kind(false);
}

fn tables_read_kind_by_kind(audience_phone: bool) {
    let text = r#"
[identity.phone]
profile = "phone"
default_country = "US"
metadata = "9.0.42"

[[dataset]]
name = "customers"
owner = "acme"

[[dataset.column]]
name = "region"
role = "dimension"
values = ["north", "south"]

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[[dataset.column]]
name = "spend"
role = "metric"
type = "float"
min = 0
max = 100

[[dataset.column]]
name = "phone"
role = "identifier"
kind = "phone"

[[dataset]]
name = "audience"
owner = "globex"

[[dataset.column]]
name = "phone"
role = "identifier"
kind = "phone"

[[dataset.column]]
name = "email"
role = "identifier"
kind = "email"

[[dataset.column]]
name = "visits"
role = "metric"
type = "integer"
min = 0
max = 100

[query]
aggregates = ["count"]
min_group_size = 5
"#;
    let audience = "name = \"audience\"\nowner = \"globex\"\n";
    let text = match audience_phone {
        true => text.to_string(),
        false => text.replace(
            &format!("{audience}\n[[dataset.column]]\nname = \"phone\"\nrole = \"identifier\"\nkind = \"phone\"\n"),
            audience,
        ),
    };
    let policy = crate::policy::unit_policy(&text);
    assert_eq!(
        policy.datasets()[1].identifier_columns().len(),
        1 + usize::from(audience_phone)
    );
    use arrow::array::{Array, FixedSizeBinaryArray};
    let dir = tempfile::tempdir().unwrap();
    let store = crate::storage::Store::open(dir.path(), None).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    // (email, phone) numbers per row, both datasets, rows in order.
    let mut given: Vec<(Option<u64>, Option<u64>)> = Vec::new();
    let mut stored_values: Vec<(Option<&str>, Option<f64>, Option<i64>)> = Vec::new();
    let mut versions = Vec::new();
    for (d, chunks) in policy.datasets().iter().zip([
        vec![1usize, 700, 1_300, 97, 0, 2_048],
        vec![1_500usize, 3, 900, 1],
    ]) {
        let mut staged = store.stage(policy.id(), d.name()).unwrap();
        for rows in chunks {
            let mut emails = Vec::new();
            let mut phones = Vec::new();
            let mut other_a = Vec::new();
            let mut other_b = Vec::new();
            for _ in 0..rows {
                // Small pools, so that rows share values within and
                // across datasets and chain email to phone.
                let e = (next(10) != 0).then(|| next(1_500));
                let p = (next(4) != 0 || e.is_none()).then(|| next(900));
                let p = p.filter(|_| audience_phone || d.name() == "customers");
                emails.push(e.map(|n| fp(0, n)));
                phones.push(p.map(|n| fp(1, n)));
                given.push((e, p));
                if d.name() == "customers" {
                    let r = ["north", "south"][next(2) as usize];
                    let spend = next(100) as f64 / 4.0;
                    other_a.push((next(7) != 0).then_some(r));
                    other_b.push(spend);
                    stored_values.push((other_a.last().copied().flatten(), Some(spend), None));
                } else {
                    let v = next(100) as i64;
                    other_b.push(v as f64);
                    stored_values.push((None, None, Some(v)));
                }
            }
            let fps = |v: &Vec<Option<[u8; 32]>>| -> ArrayRef {
                Arc::new(
                    FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                        v.iter().map(|f| f.as_ref().map(|f| f.to_vec())),
                        32,
                    )
                    .unwrap(),
                )
            };
            let batch = if d.name() == "customers" {
                RecordBatch::try_new(
                    Arc::new(Schema::new(vec![
                        Field::new("region", DataType::Utf8, true),
                        Field::new("email", DataType::FixedSizeBinary(32), true),
                        Field::new("spend", DataType::Float64, true),
                        Field::new("phone", DataType::FixedSizeBinary(32), true),
                    ])),
                    vec![
                        Arc::new(StringArray::from(other_a)),
                        fps(&emails),
                        Arc::new(Float64Array::from(other_b)),
                        fps(&phones),
                    ],
                )
            } else {
                let visits: ArrayRef = Arc::new(Int64Array::from_iter_values(
                    other_b.iter().map(|v| *v as i64),
                ));
                let mut fields = vec![
                    Field::new("phone", DataType::FixedSizeBinary(32), true),
                    Field::new("email", DataType::FixedSizeBinary(32), true),
                    Field::new("visits", DataType::Int64, true),
                ];
                let mut columns = vec![fps(&phones), fps(&emails), visits];
                if !audience_phone {
                    fields.remove(0);
                    columns.remove(0);
                }
                RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            }
            .unwrap();
            staged
                .append(&crate::upload::encode_batch(&batch).unwrap(), rows as u64)
                .unwrap();
        }
        versions.push(Some(
            store
                .commit(
                    staged,
                    crate::storage::Commit {
                        base: None,
                        upload_id: "u",
                        uploaded_by: d.owner(),
                        policy_hash: "h",
                        form: &policy.data_form(d),
                        committed_at: 1,
                        owner_key: None,
                    },
                )
                .unwrap(),
        ));
    }
    let (tables, _) = read_and_match(&store, &policy, &versions).unwrap();

    // The plain computation: every row starts as its own label; rows
    // sharing a (kind, number) take the smallest label among them,
    // until nothing changes.
    let mut label: Vec<usize> = (0..given.len()).collect();
    let mut groups: HashMap<(u8, u64), Vec<usize>> = HashMap::new();
    for (row, (e, p)) in given.iter().enumerate() {
        for (kind, v) in [(0u8, e), (1u8, p)] {
            if let Some(n) = v {
                groups.entry((kind, *n)).or_default().push(row);
            }
        }
    }
    loop {
        let mut changed = false;
        for rows in groups.values() {
            let least = rows.iter().map(|r| label[*r]).min().unwrap();
            for r in rows {
                changed |= label[*r] != least;
                label[*r] = least;
            }
        }
        if !changed {
            break;
        }
    }
    let persons: Vec<u32> = tables
        .iter()
        .flat_map(|t| t.person_of_row.iter().copied())
        .collect();
    assert_eq!(persons.len(), given.len());
    // Same partition of the rows: a bijection between labels and persons.
    let mut to_person: HashMap<usize, u32> = HashMap::new();
    let mut to_label: HashMap<u32, usize> = HashMap::new();
    for (l, p) in label.iter().zip(&persons) {
        assert_eq!(
            *to_person.entry(*l).or_insert(*p),
            *p,
            "one label, two persons"
        );
        assert_eq!(
            *to_label.entry(*p).or_insert(*l),
            *l,
            "one person, two labels"
        );
    }
    assert!(
        to_person.len() < given.len() / 2,
        "the pools make people share rows"
    );

    // Keys: a bijection with (kind, number), null where none.
    let mut key_of: HashMap<(u8, u64), Vec<u8>> = HashMap::new();
    let mut value_of: HashMap<Vec<u8>, (u8, u64)> = HashMap::new();
    let mut row = 0usize;
    let mut values = Vec::new();
    for t in &tables {
        for batch in &t.batches {
            let (schema, shown) =
                crate::query::for_caller(&batch.schema(), vec![batch.clone()]).unwrap();
            let shown = &shown[0];
            for r in 0..batch.num_rows() {
                for (kind, name, v) in [
                    (0u8, "email", given[row + r].0),
                    (1u8, "phone", given[row + r].1),
                ] {
                    let Ok(at) = schema.index_of(name) else {
                        assert_eq!(v, None, "a value without its column");
                        continue;
                    };
                    let keys = batch
                        .column(at)
                        .as_any()
                        .downcast_ref::<FixedSizeBinaryArray>()
                        .unwrap();
                    assert_eq!(keys.value_length(), 4);
                    match v {
                        None => assert!(keys.is_null(r)),
                        Some(n) => {
                            let k = keys.value(r).to_vec();
                            assert_eq!(*key_of.entry((kind, n)).or_insert(k.clone()), k);
                            assert_eq!(*value_of.entry(k).or_insert((kind, n)), (kind, n));
                        }
                    }
                }
                let text = |name: &str| {
                    schema.index_of(name).ok().and_then(|i| {
                        let c = shown.column(i).as_any().downcast_ref::<StringArray>()?;
                        c.is_valid(r).then(|| c.value(r).to_string())
                    })
                };
                let float = |name: &str| {
                    schema.index_of(name).ok().map(|i| {
                        shown
                            .column(i)
                            .as_any()
                            .downcast_ref::<Float64Array>()
                            .unwrap()
                            .value(r)
                    })
                };
                let int = |name: &str| {
                    schema.index_of(name).ok().map(|i| {
                        shown
                            .column(i)
                            .as_any()
                            .downcast_ref::<Int64Array>()
                            .unwrap()
                            .value(r)
                    })
                };
                values.push((text("region"), float("spend"), int("visits")));
            }
            row += batch.num_rows();
        }
    }
    assert_eq!(row, given.len());
    let expected: Vec<(Option<String>, Option<f64>, Option<i64>)> = stored_values
        .iter()
        .map(|(r, s, v)| (r.map(str::to_string), *s, *v))
        .collect();
    assert_eq!(values, expected);
}
