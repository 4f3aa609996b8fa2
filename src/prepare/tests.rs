use super::*;
use crate::policy::{AgreementState, Profile};
use arrow::array::AsArray;

/// The demo agreement as acme's client sees it, a secret, and a demo
/// customer file of `rows` rows (several chunks, with duplicates,
/// invalid identifiers and rows without any).
fn demo(rows: u64, dir: &std::path::Path) -> (proto::Agreement, Secret, PathBuf) {
    let policy = crate::policy::parse_text(
        include_str!("../../policies/retail-media-demo.toml"),
        std::path::Path::new("retail-media-demo.toml"),
    )
    .unwrap();
    let agreement = crate::proto::agreement_view(&policy, "acme", AgreementState::Active);
    crate::synth::generate(&crate::synth::SynthOptions {
        rows,
        overlap: 0.3,
        seed: 5,
        out: dir.to_path_buf(),
    })
    .unwrap();
    // The first 500 customers again at the end: duplicates in another
    // chunk than their first rows.
    let path = dir.join(crate::synth::ACME_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let again: String = text
        .lines()
        .skip(1)
        .take(500)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, text + &again).unwrap();
    (agreement, Secret::generate(), path)
}

#[test]
fn an_empty_or_otherwise_separated_file_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let (agreement, secret, _) = demo(10, dir.path());
    let plan = |header: &[&str]| {
        let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
        Plan::new(
            &agreement,
            "customers",
            Keys::Shared(&secret),
            &header,
            &BTreeMap::new(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    let semicolons = plan(&["email;phone;region;age_band;lifetime_value"]);
    assert!(semicolons.contains("--delimiter ';'"), "{semicolons}");
    assert!(!semicolons.contains("email"), "{semicolons}");
    let empty = plan(&[]);
    assert!(empty.contains("the input is empty"), "{empty}");
    let tabs = plan(&["email\tphone"]);
    assert!(tabs.contains("--delimiter"), "{tabs}");
    // A real header with a missing column still names the column.
    let missing = plan(&["email", "phone"]);
    assert!(missing.contains("--map"), "{missing}");
}

fn open(path: &std::path::Path) -> InputReader {
    InputReader::open(
        path,
        InputFormat::Csv,
        CsvOptions::default(),
        crate::upload::ROWS_PER_MESSAGE,
    )
    .unwrap()
}

fn plan(agreement: &proto::Agreement, secret: &Secret, reader: &InputReader) -> Plan {
    Plan::new(
        agreement,
        "customers",
        secret.into(),
        reader.header(),
        &BTreeMap::new(),
    )
    .unwrap()
}

/// Chunks prepared on 1 to 3 threads come out in input order with the
/// same batches and counts as chunk by chunk, and each fingerprint is
/// the one the single-value fingerprinter gives the normalised input.
/// The duplicate table is made for the file's rows as its first chunk
/// predicts, and never for more than MOST_EXPECTED values, however
/// short the first rows are next to the file's size.
#[test]
fn the_expected_values_are_predicted_and_capped() {
    // 8,192 values in 800 KiB of a 1 GiB file.
    let n = expected_values(8_192, 800 << 10, 1 << 30);
    assert!((10_900_000..11_000_000).contains(&n), "{n}");
    assert_eq!(expected_values(8_192, 8_192, u64::MAX / 2), MOST_EXPECTED);
    assert_eq!(expected_values(8_192, 1, 1 << 40), MOST_EXPECTED);
    assert_eq!(expected_values(0, 0, 1 << 30), 0);
    assert_eq!(expected_values(0, 4_096, 1 << 30), 0);
}

#[test]
fn preparing_on_several_threads_keeps_order_values_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (agreement, secret, path) = demo(30_000, dir.path());
    let mut reader = open(&path);
    let mut one_by_one = Preparer::new(plan(&agreement, &secret, &reader));
    let indices = one_by_one.plan().input_indices();
    let mut expected = Vec::new();
    let mut inputs = Vec::new();
    while let Some(chunk) = reader
        .next_chunk(crate::upload::ROWS_PER_MESSAGE, &indices)
        .unwrap()
    {
        expected.push(one_by_one.prepare(&chunk).unwrap());
        inputs.push(chunk);
    }
    assert!(expected.len() >= 4, "{} chunks", expected.len());
    let stats = one_by_one.stats().clone();
    assert!(stats.duplicates > 0 && stats.rows_without_identifier > 0);
    assert!(!stats.invalid.is_empty());

    // Each row's identifiers fingerprinted one value at a time from the
    // raw input; rows with neither are left out.
    let salt: [u8; 32] = hex::decode(&agreement.salt).unwrap().try_into().unwrap();
    let identifiers = [
        (
            "email",
            Profile::Email {
                gmail_canonical: true,
                standard: Standard::Cleanroom,
            },
        ),
        (
            "phone",
            Profile::Phone {
                default_country: "US".into(),
                standard: Standard::Cleanroom,
            },
        ),
    ]
    .map(|(kind, profile)| {
        let at = one_by_one
            .plan()
            .columns
            .iter()
            .position(|c| c.name == kind)
            .unwrap();
        let normaliser = Normaliser::new(&profile).unwrap();
        (at, normaliser, Fingerprinter::new(&secret, &salt, kind))
    });
    let mut buf = String::new();
    for (chunk, batch) in inputs.iter().zip(&expected) {
        let mut want: Vec<[Option<[u8; 32]>; 2]> = Vec::new();
        for i in 0..chunk.len() {
            let row = identifiers.each_ref().map(|(at, normaliser, f)| {
                let raw = &chunk.columns[*at];
                (raw.is_valid(i) && normaliser.normalise_into(raw.value(i), &mut buf).is_ok())
                    .then(|| f.fingerprint(&buf))
            });
            if row.iter().any(Option::is_some) {
                want.push(row);
            }
        }
        let got: Vec<[Option<[u8; 32]>; 2]> = (0..batch.num_rows())
            .map(|r| {
                identifiers.each_ref().map(|(at, _, _)| {
                    let column = batch.column(*at).as_fixed_size_binary();
                    column
                        .is_valid(r)
                        .then(|| column.value(r).try_into().unwrap())
                })
            })
            .collect();
        assert_eq!(got, want);
    }

    for workers in 1..=3 {
        let mut preparer = Preparer::new(plan(&agreement, &secret, &open(&path)));
        let mut got = Vec::new();
        let complete = preparer
            .prepare_all(open(&path), workers, Ok, |_, batch, _| {
                got.push(batch);
                Ok(true)
            })
            .unwrap();
        assert!(complete);
        assert_eq!(got, expected, "{workers} workers");
        assert_eq!(preparer.stats(), &stats, "{workers} workers");
    }
}

/// A bad cell stops the preparation with the first bad row in input
/// order, whichever thread reached it first; a taker that stops early
/// ends it without a hang.
#[test]
fn the_first_bad_row_in_input_order_is_the_one_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (agreement, secret, path) = demo(30_000, dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let purchases = header.iter().position(|h| *h == "purchases").unwrap();
    // Data rows 20,000 and 9,000 (a later chunk first, then an earlier
    // one) get a purchases cell that is not a number.
    let broken: String = text
        .lines()
        .enumerate()
        .map(|(line, l)| {
            if line == 20_000 || line == 9_000 {
                let mut cells: Vec<&str> = l.split(',').collect();
                cells[purchases] = "lots";
                cells.join(",") + "\n"
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let broken_path = dir.path().join("broken.csv");
    std::fs::write(&broken_path, broken).unwrap();
    for workers in 1..=3 {
        let mut preparer = Preparer::new(plan(&agreement, &secret, &open(&broken_path)));
        let mut taken = 0;
        let e = preparer
            .prepare_all(open(&broken_path), workers, Ok, |_, _, _| {
                taken += 1;
                Ok(true)
            })
            .unwrap_err();
        match e {
            PrepareError::Value { row, column, rule } => {
                assert_eq!((row, column.as_str()), (9_000, "purchases"));
                assert_eq!(rule, "is not an integer");
            }
            other => panic!("{other}"),
        }
        assert_eq!(taken, 1, "only the chunk before the bad one was taken");

        let mut preparer = Preparer::new(plan(&agreement, &secret, &open(&path)));
        let complete = preparer
            .prepare_all(open(&path), workers, Ok, |_, _, _| Ok(false))
            .unwrap();
        assert!(!complete);
        assert_eq!(
            preparer.stats().rows_read,
            crate::upload::ROWS_PER_MESSAGE as u64
        );
    }
}
