//! The web console in a real browser: headless Chromium driven through
//! ChromeDriver (Debian's `chromium` and `chromium-driver`), against a real
//! server and `cleanroom console` processes on 127.0.0.1. Screenshots at
//! 1280 and 390 pixels wide go to `target/tmp/console-screenshots/`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use serde_json::{Value, json};

/// A `cleanroom console` process and the address it printed.
struct ConsoleProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`
    base: String,
    token: String,
}

impl Drop for ConsoleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn console(server: &TestServer, org: &str) -> ConsoleProcess {
    let pki = server.pki.path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["console", "--listen", "127.0.0.1:0", "--server"])
        .arg(server.url())
        .arg("--ca")
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join(format!("{org}.pem")))
        .arg("--key")
        .arg(pki.join(format!("{org}-key.pem")))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let (base, token) = url.split_once("/?token=").unwrap();
    ConsoleProcess {
        child,
        base: base.to_string(),
        token: token.to_string(),
    }
}

/// One HTTP/1.1 exchange on a fresh connection: status, headers, body.
fn http(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, String, Vec<u8>) {
    let host = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    // Read the head, then the body by its length or its chunks: a peer may
    // keep the connection open whatever the request asked.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let split = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("{method} {base}{path}: {e}"));
        assert!(n > 0, "{method} {base}{path}: closed before an answer");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut rest = raw[split + 4..].to_vec();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let lower = head.to_ascii_lowercase();
    let mut more = |rest: &mut Vec<u8>| {
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("{method} {base}{path}: {e}"));
        rest.extend_from_slice(&buf[..n]);
        n > 0
    };
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while rest.len() < len && more(&mut rest) {}
        rest.truncate(len);
    } else if lower.contains("transfer-encoding: chunked") {
        while !rest.windows(5).any(|w| w == b"0\r\n\r\n") && more(&mut rest) {}
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let end = at + rest[at..].windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[at..end]).unwrap().trim(), 16)
                    .unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[end + 2..end + 2 + size]);
            at = end + 2 + size + 2;
        }
        rest = out;
    } else {
        while more(&mut rest) {}
    }
    (status, head, rest)
}

/// A browser session through ChromeDriver's WebDriver endpoint.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            &self.base,
            "DELETE",
            &format!("/session/{}", self.session),
            &[],
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Installs Debian's Chromium and its driver when the machine lacks them
/// (as `.ci/run` does), so the suite's one command runs on a fresh machine.
fn chromedriver() -> PathBuf {
    let found = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
    };
    if found("chromedriver").is_none() || found("chromium").is_none() {
        let status = Command::new("apt-get")
            .args(["install", "-y", "-q", "chromium", "chromium-driver"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "the console's browser tests need Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        );
    }
    found("chromedriver").expect("chromedriver on the PATH")
}

impl Browser {
    fn start(width: u32) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while TcpStream::connect(base.trim_start_matches("http://")).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                         format!("--window-size={width},900")]
            }
        }}});
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
        };
        let answer = browser.call("POST", "/session", Some(caps));
        browser.session = answer["sessionId"].as_str().unwrap().to_string();
        browser
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let text = body.map(|b| b.to_string());
        let (status, _, bytes) = http(
            &self.base,
            method,
            path,
            &[("Content-Type", "application/json")],
            text.as_deref().map(str::as_bytes),
        );
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, 200, "{method} {path}: {value}");
        value["value"].clone()
    }

    fn at(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    fn open(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(json!({ "url": url })));
    }

    fn find_all(&self, css: &str) -> Vec<String> {
        let found = self.call(
            "POST",
            &self.at("/elements"),
            Some(json!({"using": "css selector", "value": css})),
        );
        found
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e.as_object()
                    .unwrap()
                    .values()
                    .next()
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    /// The first element `css` selects, waiting up to 10 s for it: a click
    /// that submits a form may return before the next page is there.
    fn find(&self, css: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(first) = self.find_all(css).first() {
                return first.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no element {css} in\n{}",
                self.source()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text(&self, css: &str) -> String {
        let e = self.find(css);
        self.call("GET", &self.at(&format!("/element/{e}/text")), None)
            .as_str()
            .unwrap()
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.call(
            "POST",
            &self.at(&format!("/element/{e}/click")),
            Some(json!({})),
        );
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.call(
            "POST",
            &self.at(&format!("/element/{e}/clear")),
            Some(json!({})),
        );
        self.call(
            "POST",
            &self.at(&format!("/element/{e}/value")),
            Some(json!({ "text": text })),
        );
    }

    fn source(&self) -> String {
        self.call("GET", &self.at("/source"), None)
            .as_str()
            .unwrap()
            .to_string()
    }

    fn url(&self) -> String {
        self.call("GET", &self.at("/url"), None)
            .as_str()
            .unwrap()
            .to_string()
    }

    fn cookie(&self) -> String {
        let cookies = self.call("GET", &self.at("/cookie"), None);
        let c = cookies
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "cleanroom_console")
            .expect("the console's cookie");
        format!("cleanroom_console={}", c["value"].as_str().unwrap())
    }

    /// A screenshot at `width` pixels, written under the target folder.
    fn screenshot(&self, width: u32, name: &str) -> PathBuf {
        self.call(
            "POST",
            &self.at("/window/rect"),
            Some(json!({"width": width, "height": 900})),
        );
        // Nothing wider than the window: no page scrolls sideways.
        let wide = self.call(
            "POST",
            &self.at("/execute/sync"),
            Some(json!({"script": "const d = document.documentElement, w = d.clientWidth; const wide = [...document.querySelectorAll('body *')].filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > w + 1).map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right)).slice(0, 5); if (d.scrollWidth > w + 1) wide.push('page ' + d.scrollWidth + ' > ' + w); return wide;", "args": []})),
        );
        assert_eq!(wide, json!([]), "{name} at {width}: wider than the window");
        let png = self.call("GET", &self.at("/screenshot"), None);
        let bytes = base64_decode(png.as_str().unwrap());
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}-{width}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

/// Standard base64, as WebDriver sends screenshots.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64"),
        }
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let pads = chunk.iter().filter(|c| **c == b'=').count();
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= if *c == b'=' { 0 } else { value(*c) } << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pads]);
    }
    out
}

/// The text of every cell of the page's result table, row by row.
fn table_cells(browser: &Browser) -> Vec<Vec<String>> {
    let rows = browser.find_all("main table tbody tr");
    rows.iter()
        .map(|row| {
            let cells = browser.call(
                "POST",
                &browser.at(&format!("/element/{row}/elements")),
                Some(json!({"using": "css selector", "value": "td"})),
            );
            cells
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let id = c
                        .as_object()
                        .unwrap()
                        .values()
                        .next()
                        .unwrap()
                        .as_str()
                        .unwrap();
                    browser
                        .call("GET", &browser.at(&format!("/element/{id}/text")), None)
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyst_works_the_agreement_in_a_browser() {
    let server = TestServer::start().await;
    let (dir, _) = common::synth(3_000, 0.5);
    common::upload_demo(&server, "acme", dir.path()).await;
    common::upload_demo(&server, "globex", dir.path()).await;
    let acme = console(&server, "acme");
    let globex = console(&server, "globex");
    let (acme_base, acme_token) = (acme.base.clone(), acme.token.clone());
    let globex_base = globex.base.clone();
    let globex_token = globex.token.clone();
    let base = acme.base.clone();

    let cookie = tokio::task::spawn_blocking(move || {
        // Without the token or its cookie: refused, and nothing shown.
        let (status, head, body) = http(&acme_base, "GET", "/agreements", &[], None);
        assert_eq!(status, 401);
        let head = head.to_ascii_lowercase();
        for h in [
            "content-security-policy: default-src 'none'",
            "script-src 'none'",
            "referrer-policy: no-referrer",
            "cache-control: no-store",
            "x-frame-options: deny",
        ] {
            assert!(head.contains(h), "{h} not in\n{head}");
        }
        assert!(!String::from_utf8_lossy(&body).contains("retail-media-demo"));
        let (status, _, _) = http(&acme_base, "GET", "/?token=wrong", &[], None);
        assert_eq!(status, 401);
        // Through another host name (a page of another site resolving to
        // 127.0.0.1): refused even with the token.
        let (status, _, _) = http(
            &acme_base,
            "GET",
            &format!("/?token={acme_token}"),
            &[("Host", "evil.example:80")],
            None,
        );
        assert_eq!(status, 403);

        let browser = Browser::start(1280);
        browser.open(&format!("{acme_base}/?token={acme_token}"));
        assert!(browser.url().ends_with("/agreements"), "{}", browser.url());
        assert_eq!(browser.text("#org"), "acme");
        browser.screenshot(1280, "agreements");
        browser.click("a[href='/agreements/retail-media-demo']");
        browser.find("#sql");
        let page = browser.source();
        assert!(page.contains("lift_by_region"), "{page}");
        for (w, name) in [(1280, "agreement"), (390, "agreement")] {
            browser.screenshot(w, name);
        }
        // Every control has its label.
        for input in browser.find_all("main input:not([type=hidden]), main textarea") {
            let id = browser.call(
                "GET",
                &browser.at(&format!("/element/{input}/attribute/id")),
                None,
            );
            let id = id.as_str().unwrap().to_string();
            assert!(
                !browser.find_all(&format!("label[for='{id}']")).is_empty(),
                "no label for #{id}"
            );
        }

        // The lift template: a chart with the 95% interval of each bar.
        browser.screenshot(1280, "agreement");
        browser.type_into("#lift_by_region-min_exposures", "1");
        browser.click("form:has(input[value='lift_by_region']) button[type=submit]");
        browser.find("p.ok");
        let page = browser.source();
        assert!(page.contains("lift_by_region: answer"), "{page}");
        let bars = browser.find_all("svg.chart rect");
        let intervals = browser.find_all("svg.chart path.interval");
        assert!(!bars.is_empty(), "{page}");
        assert_eq!(bars.len(), intervals.len(), "an interval per bar");
        assert!(page.contains("95% within"), "{page}");
        let shown = table_cells(&browser);
        assert_eq!(shown.len(), bars.len(), "a bar per released row");
        browser.screenshot(1280, "lift");
        browser.screenshot(390, "lift");
        // The download is the answer shown, not a new query.
        let csv_link = browser.find("a[href$='.csv']");
        let href = browser.call(
            "GET",
            &browser.at(&format!("/element/{csv_link}/attribute/href")),
            None,
        );
        let path = href
            .as_str()
            .unwrap()
            .trim_start_matches(&acme_base)
            .to_string();
        let cookie = browser.cookie();
        let (status, _, csv) = http(&acme_base, "GET", &path, &[("Cookie", &cookie)], None);
        assert_eq!(status, 200);
        let csv = String::from_utf8(csv).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), shown.len() + 1, "{csv}");
        for (line, row) in lines[1..].iter().zip(&shown) {
            assert_eq!(line.split(',').next().unwrap(), row[0], "{csv}");
        }
        let (status, _, parquet) = http(
            &acme_base,
            "GET",
            &path.replace(".csv", ".parquet"),
            &[("Cookie", &cookie)],
            None,
        );
        assert_eq!(status, 200);
        assert!(parquet.starts_with(b"PAR1") && parquet.ends_with(b"PAR1"));
        // Without the cookie the download is refused too.
        assert_eq!(http(&acme_base, "GET", &path, &[], None).0, 401);

        // A refused query: its rule and what to do, beside the query.
        browser.open(&format!("{acme_base}/agreements/retail-media-demo"));
        browser.type_into(
            "#sql",
            "SELECT c.email FROM customers c -- <b class=injected>x</b>",
        );
        browser.click("form:has(#sql) button[type=submit]");
        let rule = browser.text("#rule");
        assert!(rule.contains('.'), "a rule name: {rule}");
        let alert = browser.text(".refusal");
        assert!(alert.contains("What to do"), "{alert}");
        // The query is kept as text: the tag in it is not an element.
        assert!(browser.source().contains("SELECT c.email FROM customers c"));
        assert!(
            browser.find_all("b.injected").is_empty(),
            "an injected tag became an element"
        );
        browser.screenshot(1280, "refused");
        browser.screenshot(390, "refused");

        // The budget: the lift answer's epsilon is spent.
        browser.click("nav a[href$='/budget']");
        browser.find("#budget");
        let left: f64 = browser.text("#left").parse().unwrap();
        assert!((0.0..10.0).contains(&left), "{left}");
        browser.screenshot(1280, "budget");

        // The audit log, with the page's chain.
        browser.click("nav a[href$='/audit']");
        browser.find("#chain");
        let page = browser.source();
        assert!(
            page.contains("query") && page.contains("accepted") && page.contains("rejected"),
            "{page}"
        );
        let chain = browser.text("#chain");
        assert!(!chain.contains("broken"), "{chain}");
        browser.screenshot(1280, "audit");
        browser.screenshot(390, "audit");

        // Datasets and the access report are acme's own.
        browser.click("nav a[href$='/datasets']");
        browser.find("h1");
        while !browser.source().contains("Your datasets") {
            std::thread::sleep(Duration::from_millis(100));
        }
        let page = browser.source();
        assert!(
            page.contains("customers") && !page.contains(">audience<"),
            "{page}"
        );
        // Administration: acme administers no agreement, and is told which
        // right that needs.
        browser.open(&format!("{acme_base}/admin"));
        assert_eq!(browser.text("#rule"), "party.rights");
        browser.open(&format!(
            "{acme_base}/agreements/retail-media-demo/datasets"
        ));
        browser.click("nav a[href$='/access']");
        let started = Instant::now();
        while !browser.source().contains("Use of the agreement") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no access report"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(browser);

        // globex's console: its own view only, and acme's cookie is not its.
        let (status, _, _) = http(
            &globex_base,
            "GET",
            "/agreements",
            &[("Cookie", &cookie)],
            None,
        );
        assert_eq!(status, 401);
        let browser = Browser::start(1280);
        browser.open(&format!("{globex_base}/?token={globex_token}"));
        assert_eq!(browser.text("#org"), "globex");
        browser.open(&format!(
            "{globex_base}/agreements/retail-media-demo/datasets"
        ));
        let page = browser.source();
        assert!(
            page.contains("audience") && !page.contains(">customers<"),
            "{page}"
        );
        browser.open(&format!("{globex_base}/agreements/retail-media-demo"));
        let page = browser.source();
        assert!(
            !page.contains("lift_by_region"),
            "globex may not run acme's templates: {page}"
        );
        cookie
    })
    .await
    .unwrap();

    // The server goes away: the console says so on the page and stays up.
    server.stop().await.unwrap();
    let (status, _, body) = tokio::task::spawn_blocking(move || {
        http(&base, "GET", "/agreements", &[("Cookie", &cookie)], None)
    })
    .await
    .unwrap();
    let body = String::from_utf8_lossy(&body).to_string();
    assert_eq!(status, 200);
    assert!(body.contains(r#"id="unreachable""#), "{body}");
    let mut acme = acme;
    assert!(
        acme.child.try_wait().unwrap().is_none(),
        "the console stays up"
    );
    drop((acme, globex));
}
