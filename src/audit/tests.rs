use super::*;

fn event(n: u64) -> Event {
    Event {
        org: "acme".into(),
        agreement: "retail-media-demo".into(),
        policy_hash: "ab".repeat(32),
        action: "upload",
        accepted: n.is_multiple_of(2),
        rule: (!n.is_multiple_of(2)).then(|| "metric.bounds".to_string()),
        subject: Some("customers".into()),
        rows: Some(n * 10),
        ..Event::default()
    }
}

fn log_with(n: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    for i in 0..n {
        log.append(event(i), 1_700_000_000 + i as i64).unwrap();
    }
    dir
}

fn lines(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(LOG_FILE))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(dir: &Path, lines: &[String]) {
    std::fs::write(dir.join(LOG_FILE), lines.join("\n") + "\n").unwrap();
}

#[test]
fn an_intact_log_verifies_and_reopens() {
    let dir = log_with(5);
    assert_eq!(verify(dir.path()).unwrap().entries, 5);
    let log = AuditLog::open(dir.path()).unwrap();
    let e = log.append(event(5), 1).unwrap();
    assert_eq!(e.seq, 6);
    assert_eq!(verify(dir.path()).unwrap().entries, 6);
    assert_eq!(log.entries_for("retail-media-demo").unwrap().len(), 6);
    assert!(log.entries_for("other").unwrap().is_empty());
}

#[test]
fn editing_any_entry_is_detected_at_that_entry() {
    for target in 0..5usize {
        let dir = log_with(5);
        let mut l = lines(dir.path());
        l[target] = l[target].replace("\"time\":", "\"time\":1");
        write_lines(dir.path(), &l);
        match verify(dir.path()) {
            Err(AuditError::Broken { line, .. }) => assert_eq!(line, target as u64 + 1),
            other => panic!("edit of entry {target} not detected: {other:?}"),
        }
        assert!(AuditLog::open(dir.path()).is_err());
    }
}

#[test]
fn deleting_or_reordering_any_entry_is_detected() {
    for target in 0..5usize {
        let dir = log_with(5);
        let mut l = lines(dir.path());
        l.remove(target);
        write_lines(dir.path(), &l);
        assert!(
            verify(dir.path()).is_err(),
            "deletion of entry {target} not detected"
        );
    }
    let dir = log_with(5);
    let mut l = lines(dir.path());
    l.swap(1, 2);
    write_lines(dir.path(), &l);
    assert!(matches!(
        verify(dir.path()),
        Err(AuditError::Broken { line: 2, .. })
    ));
}

#[test]
fn a_rehashed_edit_still_breaks_the_next_link() {
    let dir = log_with(3);
    let mut l = lines(dir.path());
    let mut e: Entry = serde_json::from_str(&l[0]).unwrap();
    e.rows = Some(999);
    e.hash = hex::encode(entry_hash(&e, &GENESIS));
    l[0] = serde_json::to_string(&e).unwrap();
    write_lines(dir.path(), &l);
    assert!(matches!(
        verify(dir.path()),
        Err(AuditError::Broken { line: 2, .. })
    ));
}

#[test]
fn another_partys_row_counts_are_not_shown() {
    let entry = |org: &str, action: &str, subject: &str, rows| Entry {
        seq: 1,
        time: 0,
        org: org.into(),
        agreement: "a".into(),
        policy_hash: String::new(),
        action: action.into(),
        decision: "accepted".into(),
        rule: None,
        subject: Some(subject.into()),
        sql_hash: None,
        rows,
        suppressed: None,
        epsilon: None,
        delta: None,
        query_id: None,
        template: None,
        params_hash: None,
        prev: String::new(),
        hash: String::new(),
    };
    let owner = |d: &str| match d {
        "customers" => Some("acme"),
        "audience" => Some("globex"),
        _ => None,
    };
    let upload = entry("acme", "upload", "customers v3", Some(1_234));
    let erase = entry(
        "acme",
        "erase",
        "customers: 7 row(s) removed, 1 older version(s) deleted",
        Some(7),
    );
    let retention = entry(
        "(operator)",
        "retention",
        "audience: 2 version(s) deleted, older than 30 days",
        Some(99),
    );
    let query = entry("acme", "query", "customers x audience", Some(4));
    // Its own figures, as written.
    for e in [&upload, &erase] {
        assert_eq!(&e.clone().as_seen_by("acme", owner), e);
    }
    assert_eq!(retention.clone().as_seen_by("globex", owner), retention);
    // Another party's: no count anywhere in the entry.
    for e in [&upload, &erase] {
        let seen = e.clone().as_seen_by("globex", owner);
        assert_eq!(seen.rows, None);
        let text = serde_json::to_string(&seen).unwrap();
        assert!(!text.contains("1234") && !text.contains('7'), "{text}");
    }
    assert_eq!(
        erase.clone().as_seen_by("globex", owner).subject.as_deref(),
        Some("customers")
    );
    assert_eq!(retention.clone().as_seen_by("acme", owner).rows, None);
    // A query's released row count is not another party's data.
    assert_eq!(query.clone().as_seen_by("globex", owner), query);
}

#[test]
fn a_redacted_count_cannot_be_found_again_from_the_chain_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    let mut upload = event(0);
    upload.rows = Some(1_234);
    log.append(upload, 1_700_000_000).unwrap();
    let query = Event {
        action: "query",
        accepted: true,
        rows: Some(3),
        ..event(0)
    };
    log.append(query, 1_700_000_001).unwrap();
    let owner = |d: &str| (d == "customers").then_some("acme");

    // The owner reads the chain whole and linked.
    let own = log
        .page_seen_by("retail-media-demo", 0, 10, "acme", owner)
        .unwrap();
    assert_eq!(own[0].rows, Some(1_234));
    assert_eq!(own[1].prev, own[0].hash);
    assert!(!own[0].hash.is_empty());

    // The partner: no count, and no hash to try counts against,
    // whichever page the entry after it is read on.
    let seen = log
        .page_seen_by("retail-media-demo", 0, 10, "globex", owner)
        .unwrap();
    assert_eq!(seen[0].rows, None);
    assert_eq!(seen[0].hash, "");
    assert_eq!(seen[1].prev, "");
    assert_eq!(
        seen[1].hash, own[1].hash,
        "an entry not redacted keeps its hash"
    );
    let second_page = log
        .page_seen_by("retail-media-demo", 1, 10, "globex", owner)
        .unwrap();
    assert_eq!(second_page[0].prev, "");
    let shown: Vec<&str> = seen
        .iter()
        .flat_map(|e| [e.prev.as_str(), e.hash.as_str()])
        .collect();
    let guess = |rows| {
        let mut guess = seen[0].clone();
        guess.rows = Some(rows);
        guess.subject = own[0].subject.clone();
        hex::encode(entry_hash(&guess, &GENESIS))
    };
    // The attack works on what the owner reads.
    assert_eq!(guess(1_234), own[0].hash);
    for rows in 0..5_000 {
        assert!(
            !shown.contains(&guess(rows).as_str()),
            "the count is found again"
        );
    }
}

#[test]
fn a_full_disk_fails_the_append_and_changes_nothing() {
    let Some(disk) = crate::disk::SmallDisk::mount(256 * 1024) else {
        return;
    };
    let dir = disk.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let log = AuditLog::open(&dir).unwrap();
    for i in 0..3 {
        log.append(event(i), 1).unwrap();
    }
    let filler = disk.fill();
    // Appends go on while the last page has room; then they fail.
    let mut committed = 3;
    let mut failures = 0;
    for i in 0..200 {
        match log.append(event(i), 2) {
            Ok(e) => {
                assert_eq!(failures, 0, "an append succeeded after one failed");
                committed += 1;
                assert_eq!(e.seq, committed);
            }
            Err(e) => {
                assert!(e.is_unavailable(), "{e}");
                failures += 1;
            }
        }
        assert_eq!(verify(&dir).unwrap().entries, committed);
    }
    assert!(failures > 100, "the disk never filled: {failures}");
    std::fs::remove_file(filler).unwrap();
    let e = log.append(event(9), 3).unwrap();
    assert_eq!(e.seq, committed + 1);
    assert_eq!(verify(&dir).unwrap().entries, committed + 1);
    drop(log);
    let reopened = AuditLog::open(&dir).unwrap();
    assert_eq!(reopened.append(event(1), 4).unwrap().seq, committed + 2);
    assert_eq!(verify(&dir).unwrap().entries, committed + 2);
}

#[test]
fn a_failed_head_write_takes_the_line_back() {
    let dir = log_with(3);
    let before = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
    // The head's temporary file cannot be created.
    let blocker = dir.path().join(format!("{HEAD_FILE}.tmp"));
    std::fs::create_dir(&blocker).unwrap();
    let log = AuditLog::open(dir.path()).unwrap();
    assert!(log.append(event(3), 1).is_err());
    assert!(log.append(event(4), 1).is_err());
    assert_eq!(std::fs::read(dir.path().join(LOG_FILE)).unwrap(), before);
    assert_eq!(verify(dir.path()).unwrap().entries, 3);
    std::fs::remove_dir(&blocker).unwrap();
    assert_eq!(log.append(event(3), 1).unwrap().seq, 4);
    assert_eq!(verify(dir.path()).unwrap().entries, 4);
}

#[test]
fn every_byte_of_a_line_is_checked() {
    let dir = log_with(3);
    let path = dir.path().join(LOG_FILE);
    let original = std::fs::read(&path).unwrap();
    for at in 0..original.len() {
        for flip in [0x01u8, 0x20] {
            let mut damaged = original.clone();
            damaged[at] ^= flip;
            std::fs::write(&path, &damaged).unwrap();
            assert!(
                verify(dir.path()).is_err(),
                "byte {at} ^ {flip:#x} unnoticed"
            );
        }
    }
    std::fs::write(&path, &original).unwrap();
    assert_eq!(verify(dir.path()).unwrap().entries, 3);
}

#[test]
fn a_line_cut_off_mid_write_is_named_and_removed_at_open() {
    let dir = log_with(3);
    let path = dir.path().join(LOG_FILE);
    let whole = std::fs::read(&path).unwrap();
    let mut torn = whole.clone();
    torn.extend_from_slice(br#"{"seq":4,"time":1,"org":"ac"#);
    std::fs::write(&path, &torn).unwrap();
    let err = verify(dir.path()).unwrap_err().to_string();
    assert!(err.contains("cut off mid-write"), "{err}");
    let log = AuditLog::open(dir.path()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), whole);
    assert_eq!(log.append(event(3), 1).unwrap().seq, 4);
    assert_eq!(verify(dir.path()).unwrap().entries, 4);
    // A committed entry whose newline is removed is not taken for a
    // torn one: the head is ahead of the log, and opening refuses.
    let mut cut = std::fs::read(&path).unwrap();
    cut.pop();
    std::fs::write(&path, &cut).unwrap();
    drop(log);
    assert!(AuditLog::open(dir.path()).is_err());
}
