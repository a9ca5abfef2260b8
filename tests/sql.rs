//! Offline checks of `sql/`: no Snowflake account is reachable here, so the files are
//! checked as far as that is possible without one.
//!
//! - Every statement parses with `sqlparser`'s Snowflake dialect, or is of a kind that
//!   parser does not know (SPCS objects, pipes, tasks, Snowflake Scripting): those are
//!   listed with the reason, and what they wrap (a pipe's or task's `COPY INTO`, the SQL
//!   statements inside a procedure) is parsed on its own. A statement that fails for any
//!   other reason fails the test.
//! - Every file is idempotent (`IF NOT EXISTS` / `OR REPLACE` on every `CREATE`) and
//!   documents every `<% variable %>` it uses in its `snow sql -D` line.
//! - Every JSON path the SQL reads exists in the grype samples (`tests/fixtures/grype/`)
//!   or in the daemon's own inventory, change and failure records, serialized from the
//!   daemon's own types.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{TimeZone, Utc};
use regex::Regex;
use serde_json::Value;
use sqlparser::dialect::SnowflakeDialect;
use sqlparser::parser::Parser;

use spcs_image_scanner::changes::{ChangeRecord, ChangedFinding, Finding};
use spcs_image_scanner::digest::Digest;
use spcs_image_scanner::failures::{FailureKind, FailureRecord};
use spcs_image_scanner::watcher::InventoryRecord;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sql_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("sql"))
        .expect("sql/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected the deployment's SQL files, found {files:?}"
    );
    files
}

fn name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------
// Splitting and templating

/// A statement of a file: its text (comments kept out) and the line it starts on.
#[derive(Debug, Clone)]
struct Statement {
    line: usize,
    text: String,
}

/// Splits SQL text on `;` outside quotes, `$$` blocks and comments; comments are dropped.
fn split(sql: &str) -> Vec<Statement> {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = Vec::new();
    let mut current = String::new();
    let mut line = 1;
    let mut start_line = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '-' && next == Some('-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                if chars[i] == '\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
            continue;
        }
        if c == '\n' {
            line += 1;
        }
        if !c.is_whitespace() && start_line.is_none() && c != ';' {
            start_line = Some(line);
        }
        if c == '\'' || c == '"' {
            // A quoted string or identifier; a doubled quote is an escaped one.
            current.push(c);
            i += 1;
            while i < chars.len() {
                current.push(chars[i]);
                if chars[i] == '\n' {
                    line += 1;
                }
                if chars[i] == c {
                    if chars.get(i + 1) == Some(&c) {
                        current.push(c);
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '$' && next == Some('$') {
            current.push_str("$$");
            i += 2;
            while i < chars.len() && !(chars[i] == '$' && chars.get(i + 1) == Some(&'$')) {
                if chars[i] == '\n' {
                    line += 1;
                }
                current.push(chars[i]);
                i += 1;
            }
            current.push_str("$$");
            i += 2;
            continue;
        }
        if c == ';' {
            let text = current.trim().to_string();
            if !text.is_empty() {
                out.push(Statement {
                    line: start_line.unwrap_or(line),
                    text,
                });
            }
            current.clear();
            start_line = None;
        } else {
            current.push(c);
        }
        i += 1;
    }
    let text = current.trim().to_string();
    if !text.is_empty() {
        out.push(Statement {
            line: start_line.unwrap_or(line),
            text,
        });
    }
    out
}

fn template_re() -> Regex {
    Regex::new(r"<%\s*([A-Za-z_][A-Za-z0-9_]*)\s*%>").unwrap()
}

/// `snow sql -D` values: each `<% name %>` becomes a plain identifier, as a value would.
fn substitute(sql: &str) -> String {
    template_re().replace_all(sql, "${1}").into_owned()
}

/// Removes quoted strings, `$$` bodies and comments (what JSON paths are not).
fn code_only(statement: &str) -> String {
    let re = Regex::new(r"(?s)\$\$.*?\$\$|'(?:[^']|'')*'").unwrap();
    re.replace_all(statement, "''").into_owned()
}

// ---------------------------------------------------------------------------------------
// Parsing

/// Statement kinds sqlparser's Snowflake dialect cannot parse, with the reason, and
/// what (if anything) inside them is SQL it can parse.
struct Unsupported {
    kind: &'static str,
    pattern: &'static str,
    reason: &'static str,
    inner: Inner,
}

#[derive(Clone, Copy, PartialEq)]
enum Inner {
    /// Nothing inside is plain SQL.
    None,
    /// The statement after the top-level `AS` (a pipe's or a task's `COPY INTO`).
    AfterAs,
    /// The SQL statements of a Snowflake Scripting body (`$$ ... $$`).
    ScriptBody,
}

const UNSUPPORTED: &[Unsupported] = &[
    Unsupported {
        kind: "CREATE ROLE ... COMMENT",
        pattern: r"^CREATE ROLE IF NOT EXISTS \w+ COMMENT",
        reason: "sqlparser 0.64 parses CREATE ROLE without Snowflake's COMMENT property",
        inner: Inner::None,
    },
    Unsupported {
        kind: "GRANT CREATE <object> ON SCHEMA",
        pattern: r"^GRANT CREATE \w+",
        reason: "sqlparser 0.64 knows no CREATE <object> schema privileges",
        inner: Inner::None,
    },
    Unsupported {
        kind: "GRANT SERVICE READ / SERVICE ROLE",
        pattern: r"^GRANT SERVICE (READ|ROLE) ",
        reason: "SPCS privileges: sqlparser 0.64 knows no SERVICE READ or service roles",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE COMPUTE POOL",
        pattern: r"^CREATE COMPUTE POOL IF NOT EXISTS ",
        reason: "SPCS object: not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE NETWORK RULE",
        pattern: r"^CREATE NETWORK RULE IF NOT EXISTS ",
        reason: "network rules are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE EXTERNAL ACCESS INTEGRATION",
        pattern: r"^CREATE EXTERNAL ACCESS INTEGRATION IF NOT EXISTS ",
        reason: "external access integrations are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE IMAGE REPOSITORY",
        pattern: r"^CREATE IMAGE REPOSITORY IF NOT EXISTS ",
        reason: "SPCS object: not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE STAGE ... ENCRYPTION",
        pattern: r"^CREATE STAGE IF NOT EXISTS \w+ DIRECTORY = \(ENABLE = TRUE\) ENCRYPTION",
        reason: "sqlparser 0.64 parses CREATE STAGE without the ENCRYPTION property",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE PIPE",
        pattern: r"^CREATE PIPE IF NOT EXISTS ",
        reason: "pipes are not in sqlparser 0.64; the COPY INTO it wraps is parsed",
        inner: Inner::AfterAs,
    },
    Unsupported {
        kind: "CREATE TASK",
        pattern: r"^CREATE OR REPLACE TASK ",
        reason: "tasks are not in sqlparser 0.64; the COPY INTO it wraps is parsed",
        inner: Inner::AfterAs,
    },
    Unsupported {
        kind: "ALTER TASK / EXECUTE TASK",
        pattern: r"^(ALTER|EXECUTE) TASK \w+( RESUME)?$",
        reason: "tasks are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE PROCEDURE ... LANGUAGE SQL",
        pattern: r"^CREATE OR REPLACE PROCEDURE \w+\([^)]*\) RETURNS VARCHAR LANGUAGE SQL EXECUTE AS OWNER AS \$\$",
        reason: "Snowflake Scripting procedures are not in sqlparser 0.64; the SQL statements of the body are parsed",
        inner: Inner::ScriptBody,
    },
    Unsupported {
        kind: "CREATE FUNCTION ... SERVICE",
        pattern: r"^CREATE OR REPLACE FUNCTION \w+\([^)]*\) RETURNS VARIANT SERVICE = ",
        reason: "service functions are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE SERVICE / ALTER SERVICE ... FROM",
        pattern: r"^(CREATE SERVICE IF NOT EXISTS|ALTER SERVICE) \w+ (IN COMPUTE POOL \w+ )?FROM @\w+ SPECIFICATION_TEMPLATE_FILE",
        reason: "SPCS services are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "EXECUTE JOB SERVICE",
        pattern: r"^EXECUTE JOB SERVICE IN COMPUTE POOL ",
        reason: "SPCS jobs are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "DROP SERVICE",
        pattern: r"^DROP SERVICE IF EXISTS \w+$",
        reason: "SPCS services are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE SNAPSHOT",
        pattern: r"^CREATE OR REPLACE SNAPSHOT \w+ FROM SERVICE ",
        reason: "block-volume snapshots are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "SHOW <SPCS object> / DESCRIBE SERVICE",
        pattern: r"^(SHOW (IMAGE REPOSITORIES|SNAPSHOTS|SERVICE CONTAINERS IN SERVICE)|DESCRIBE SERVICE) ",
        reason: "SPCS objects are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "CREATE STREAMLIT",
        pattern: r"^CREATE STREAMLIT IF NOT EXISTS ",
        reason: "Streamlit objects are not in sqlparser 0.64",
        inner: Inner::None,
    },
    Unsupported {
        kind: "GRANT ... ON STREAMLIT / FUNCTION / PROCEDURE",
        pattern: r"^GRANT USAGE ON (STREAMLIT|FUNCTION|PROCEDURE) ",
        reason: "sqlparser 0.64 has no STREAMLIT grants nor grants on a signature",
        inner: Inner::None,
    },
    Unsupported {
        kind: "Snowflake Scripting",
        pattern: r"^((DECLARE|IF|RETURN|RAISE|END|EXECUTE IMMEDIATE)\b|[a-z_]+ :=|[a-z_]+ (VARCHAR|NUMBER|BOOLEAN)$)",
        reason: "Snowflake Scripting statements inside a procedure body",
        inner: Inner::None,
    },
];

/// One statement that sqlparser could not parse, and why.
#[derive(Debug)]
struct Listed {
    at: String,
    kind: &'static str,
    reason: &'static str,
}

#[derive(Default, Debug)]
struct Outcome {
    parsed: usize,
    parsed_inner: usize,
    listed: Vec<Listed>,
    errors: Vec<String>,
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parses(text: &str) -> Result<(), String> {
    Parser::parse_sql(&SnowflakeDialect {}, text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn check_statement(at: &str, text: &str, out: &mut Outcome, inner: bool) {
    let error = match parses(text) {
        Ok(()) => {
            if inner {
                out.parsed_inner += 1;
            } else {
                out.parsed += 1;
            }
            return;
        }
        Err(e) => e,
    };
    let flat = one_line(text);
    let Some(kind) = UNSUPPORTED
        .iter()
        .find(|u| Regex::new(u.pattern).unwrap().is_match(&flat))
    else {
        out.errors.push(format!(
            "{at}: {error}\n    {}",
            flat.chars().take(160).collect::<String>()
        ));
        return;
    };
    out.listed.push(Listed {
        at: at.to_string(),
        kind: kind.kind,
        reason: kind.reason,
    });
    match kind.inner {
        Inner::None => {}
        Inner::AfterAs => {
            let Some(pos) = flat.find(" AS COPY INTO ") else {
                out.errors
                    .push(format!("{at}: {} without AS COPY INTO", kind.kind));
                return;
            };
            check_statement(
                &format!("{at} (its COPY INTO)"),
                &flat[pos + 4..],
                out,
                true,
            );
        }
        Inner::ScriptBody => {
            let (Some(open), Some(close)) = (text.find("$$"), text.rfind("$$")) else {
                out.errors
                    .push(format!("{at}: procedure without a $$ body"));
                return;
            };
            let body = &text[open + 2..close];
            let body = body
                .trim()
                .strip_suffix("END;")
                .or_else(|| body.trim().strip_suffix("END"))
                .unwrap_or(body);
            for stmt in split(body) {
                let mut t = stmt.text.trim();
                if let Some(rest) = t.strip_prefix("BEGIN") {
                    t = rest.trim();
                }
                if t.starts_with("DECLARE") {
                    // Declarations run up to BEGIN; what follows BEGIN is a statement.
                    match t.find("BEGIN") {
                        Some(b) => {
                            check_statement(&format!("{at} body"), &t[..b], out, true);
                            t = t[b + 5..].trim();
                        }
                        None => {
                            check_statement(&format!("{at} body"), t, out, true);
                            continue;
                        }
                    }
                }
                if !t.is_empty() {
                    check_statement(&format!("{at} body"), t, out, true);
                }
            }
        }
    }
}

#[test]
fn every_sql_statement_parses_or_is_listed_with_the_reason() {
    let mut out = Outcome::default();
    for file in sql_files() {
        let text = substitute(&std::fs::read_to_string(&file).unwrap());
        for stmt in split(&text) {
            let at = format!("{}:{}", name(&file), stmt.line);
            check_statement(&at, &stmt.text, &mut out, false);
        }
    }
    eprintln!(
        "parsed by sqlparser (Snowflake dialect): {} statements, and {} statements inside pipes, tasks and procedures",
        out.parsed, out.parsed_inner
    );
    eprintln!("not parsed, listed with the reason ({}):", out.listed.len());
    for l in &out.listed {
        eprintln!("  {:<28} {:<45} {}", l.at, l.kind, l.reason);
    }
    assert!(
        out.errors.is_empty(),
        "statements that do not parse, and are not of a kind listed as unsupported:\n{}",
        out.errors.join("\n")
    );
    // The pipeline's own SQL (views, COPY INTO) must be parsed, never merely listed.
    assert!(out.parsed >= 40, "only {} statements parsed", out.parsed);
    assert!(
        out.parsed_inner >= 8,
        "only {} inner statements parsed",
        out.parsed_inner
    );
}

#[test]
fn a_statement_of_an_unknown_kind_that_does_not_parse_fails_the_check() {
    let mut out = Outcome::default();
    check_statement(
        "x.sql:1",
        "CREATE OR REPLACE VIEW v AS SELEC 1",
        &mut out,
        false,
    );
    check_statement(
        "x.sql:2",
        "CREATE PIPE IF NOT EXISTS p AUTO_INGEST = TRUE AS COPY INTO t FROM (SELEC $1 FROM @s)",
        &mut out,
        false,
    );
    check_statement(
        "x.sql:3",
        "CREATE OR REPLACE VIEW v AS SELECT 1",
        &mut out,
        false,
    );
    assert_eq!(out.errors.len(), 2, "{:?}", out.errors);
    assert!(out.errors[0].starts_with("x.sql:1"), "{:?}", out.errors);
    assert!(
        out.errors[1].starts_with("x.sql:2 (its COPY INTO)"),
        "{:?}",
        out.errors
    );
    assert_eq!(out.parsed, 1);
    assert_eq!(out.listed.len(), 1, "the pipe is listed");
}

#[test]
fn the_splitter_keeps_quotes_dollar_bodies_and_drops_comments() {
    let stmts = split(
        "-- a; comment\nSELECT 'a;b' AS \"x;y\";\n/* c; */ CREATE PROCEDURE p() AS $$ BEGIN RETURN 1; END; $$;\nSELECT 'it''s;'",
    );
    let texts: Vec<&str> = stmts.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "SELECT 'a;b' AS \"x;y\"",
            "CREATE PROCEDURE p() AS $$ BEGIN RETURN 1; END; $$",
            "SELECT 'it''s;'"
        ]
    );
    assert_eq!(stmts[0].line, 2);
    assert_eq!(stmts[1].line, 3);
}

// ---------------------------------------------------------------------------------------
// Idempotence, numbering and variables

#[test]
fn every_file_is_numbered_idempotent_and_documents_its_variables() {
    let numbered = Regex::new(r"^\d\d_[a-z0-9_]+\.sql$").unwrap();
    let create = Regex::new(r"^CREATE\s+(OR\s+REPLACE\s+)?(\w+(\s+\w+)*?)\s").unwrap();
    let mut numbers = BTreeSet::new();
    let mut problems = Vec::new();
    for file in sql_files() {
        let n = name(&file);
        if !numbered.is_match(&n) {
            problems.push(format!("{n}: not named NN_name.sql"));
        }
        if !numbers.insert(n[..2].to_string()) {
            problems.push(format!("{n}: number {} used twice", &n[..2]));
        }
        let raw = std::fs::read_to_string(&file).unwrap();
        // Variables: each <% name %> the statements use appears as -D name= in the header.
        let header: String = raw
            .lines()
            .take_while(|l| l.starts_with("--") || l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        if !header.contains("snow sql -f sql/") {
            problems.push(format!(
                "{n}: the header does not say how to run it (snow sql -f)"
            ));
        }
        let used: BTreeSet<String> = template_re()
            .captures_iter(&raw)
            .map(|c| c[1].to_string())
            .collect();
        for var in &used {
            if !header.contains(&format!("-D {var}=")) {
                problems.push(format!("{n}: <% {var} %> is not in its snow sql -D line"));
            }
        }
        for stmt in split(&substitute(&raw)) {
            let flat = one_line(&stmt.text);
            let Some(c) = create.captures(&flat) else {
                continue;
            };
            let replace = c.get(1).is_some();
            if !replace && !flat.contains(" IF NOT EXISTS ") {
                problems.push(format!(
                    "{n}:{}: CREATE without OR REPLACE or IF NOT EXISTS: {}",
                    stmt.line,
                    flat.chars().take(80).collect::<String>()
                ));
            }
            // History lives in tables, pipes keep load history: never replace them.
            let object = c[2].to_uppercase();
            if replace && (object == "TABLE" || object == "PIPE") {
                problems.push(format!(
                    "{n}:{}: CREATE OR REPLACE {object} would drop loaded data or load history",
                    stmt.line
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// JSON paths

/// Every path in a JSON value: `.a.b[].c`, intermediate nodes included.
fn json_paths(value: &Value, prefix: String, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let p = format!("{prefix}.{k}");
                out.insert(p.clone());
                json_paths(v, p, out);
            }
        }
        Value::Array(items) => {
            let p = format!("{prefix}[]");
            out.insert(p.clone());
            for v in items {
                json_paths(v, p.clone(), out);
            }
        }
        _ => {}
    }
}

fn paths_of(values: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for v in values {
        json_paths(v, String::new(), &mut out);
    }
    out
}

fn grype_samples() -> Vec<Value> {
    let dir = repo().join("tests/fixtures/grype");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            docs.push(serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap());
        }
    }
    assert!(docs.len() >= 3, "grype samples in {}", dir.display());
    docs
}

fn finding(vulnerability: &str, severity: &str) -> Finding {
    Finding {
        vulnerability: vulnerability.into(),
        package: "zlib1g".into(),
        version: "1:1.2.11.dfsg-2".into(),
        package_type: "deb".into(),
        severity: severity.into(),
        fix_state: "fixed".into(),
        fix_versions: vec!["1:1.2.11.dfsg-2+deb11u2".into()],
    }
}

/// Records as the daemon writes them: its own types, every optional field set.
fn daemon_records() -> BTreeMap<&'static str, Value> {
    let at = Utc.with_ymd_and_hms(2026, 12, 3, 17, 45, 12).unwrap();
    let digest = "sha256:d7085731ff6c27b42c1997755a41d83ad2b261bac255d8ba73d039cfd195ee48";
    let inventory = InventoryRecord {
        repository: "db/schema/repo/python".into(),
        tag: "3.6".into(),
        digest: digest.into(),
        index_digest: Some(
            "sha256:43dd93b2343eb233edcfe8d99328d927426af59c47d8f45286c3e873b35a2043".into(),
        ),
        platform: Some("linux/amd64".into()),
        change: "moved".into(),
        previous_digest: Some(
            "sha256:867974dfef7c372cb185521460bb9f50c5ee7d1d776b5f44b58c3b4d34d755ef".into(),
        ),
        observed_at: at,
    };
    let change = ChangeRecord {
        digest: digest.into(),
        tags: vec!["db/schema/repo/python:3.6".into()],
        previous_result: Some("scans/d708/20261201T000000.000Z_20261130T000000Z.json".into()),
        result: "scans/d708/20261203T174512.000Z_20261203T000000Z.json".into(),
        previous_db_build: Some("2026-11-30T00:00:00Z".into()),
        db_build: Some("2026-12-03T00:00:00Z".into()),
        observed_at: at,
        added: vec![finding("CVE-2022-37434", "Critical")],
        removed: vec![finding("CVE-2018-25032", "High")],
        changed: vec![ChangedFinding {
            before: finding("CVE-2023-0001", "Medium"),
            after: finding("CVE-2023-0001", "High"),
        }],
    };
    let failure = FailureRecord {
        digest: Digest::parse(digest).unwrap(),
        kind: FailureKind::Scan,
        repositories: vec!["db/schema/repo/python".into()],
        tags: vec!["db/schema/repo/python:3.6".into()],
        attempt: 2,
        error: "syft exited 1".into(),
        next_retry: Some(at),
        observed_at: at,
    };
    BTreeMap::from([
        ("inventory", serde_json::to_value(inventory).unwrap()),
        ("change", serde_json::to_value(change).unwrap()),
        ("failure", serde_json::to_value(failure).unwrap()),
    ])
}

/// What a VARIANT column of a raw table holds.
fn document_of_column(column: &str) -> Option<&'static str> {
    match column {
        "scan" => Some("grype"),
        "inventory_record" => Some("inventory"),
        "change_record" => Some("change"),
        "failure_record" => Some("failure"),
        _ => None,
    }
}

/// `a.b[0].c` as a sample path `.a.b[].c`.
fn normalize(path: &str) -> String {
    let index = Regex::new(r"\[\d+\]").unwrap();
    format!(".{}", index.replace_all(path, "[]"))
}

/// A JSON path the SQL reads: where, from which document, and the normalized path.
#[derive(Debug)]
struct Read {
    at: String,
    document: &'static str,
    path: String,
}

/// Finds `<root>:<path>` reads. Roots are a raw table's VARIANT column (`r.scan`) or a
/// FLATTEN alias (`mt.value`), which stands for its input path plus `[]`.
fn json_reads(file: &str, statement: &Statement, unknown: &mut Vec<String>) -> Vec<Read> {
    let code = code_only(&statement.text);
    let flatten =
        Regex::new(r"(?i)FLATTEN\s*\(\s*input\s*=>\s*([\w.]+):([\w.\[\]]+)\s*\)\s+(?:AS\s+)?(\w+)")
            .unwrap();
    let access = Regex::new(
        r"(?:^|[^\w:.])((?:[A-Za-z_]\w*\.)?[A-Za-z_]\w*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*)",
    )
    .unwrap();
    let root_document = |root: &str, aliases: &BTreeMap<String, (&'static str, String)>| {
        let column = root.rsplit('.').next().unwrap();
        if let Some(alias) = root.strip_suffix(".value") {
            return aliases.get(alias).cloned();
        }
        document_of_column(column).map(|d| (d, String::new()))
    };
    let mut aliases: BTreeMap<String, (&'static str, String)> = BTreeMap::new();
    for c in flatten.captures_iter(&code) {
        match root_document(&c[1], &aliases) {
            Some((doc, base)) => {
                aliases.insert(
                    c[3].to_string(),
                    (doc, format!("{base}{}[]", normalize(&c[2]))),
                );
            }
            None => unknown.push(format!("{file}:{}: FLATTEN over {}", statement.line, &c[1])),
        }
    }
    let mut reads = Vec::new();
    for c in access.captures_iter(&code) {
        let root = &c[1];
        let at = format!("{file}:{}", statement.line);
        match root_document(root, &aliases) {
            Some((document, base)) => reads.push(Read {
                at,
                document,
                path: format!("{base}{}", normalize(&c[2])),
            }),
            None => unknown.push(format!("{at}: {root}:{} reads an unknown document", &c[2])),
        }
    }
    reads
}

fn sql_json_reads() -> (Vec<Read>, Vec<String>) {
    let mut reads = Vec::new();
    let mut unknown = Vec::new();
    for file in sql_files() {
        let text = substitute(&std::fs::read_to_string(&file).unwrap());
        for stmt in split(&text) {
            reads.extend(json_reads(&name(&file), &stmt, &mut unknown));
        }
    }
    (reads, unknown)
}

#[test]
fn every_json_path_the_sql_reads_exists_in_the_samples_or_the_daemons_records() {
    let mut known: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    known.insert("grype", paths_of(&grype_samples()));
    for (doc, value) in daemon_records() {
        known.insert(doc, paths_of(&[value]));
    }
    let (reads, unknown) = sql_json_reads();
    assert!(unknown.is_empty(), "{}", unknown.join("\n"));
    let mut by_document: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut missing = Vec::new();
    for read in &reads {
        by_document
            .entry(read.document)
            .or_default()
            .insert(&read.path);
        if !known[read.document].contains(&read.path) {
            missing.push(format!(
                "{}: {} path {} is in no {} sample",
                read.at, read.document, read.path, read.document
            ));
        }
    }
    for (doc, paths) in &by_document {
        eprintln!("{doc}: {} paths read, all present: {paths:?}", paths.len());
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    // The fields the issue names, read where grype writes them.
    for needed in [
        ".matches[].vulnerability.knownExploited",
        ".matches[].vulnerability.epss[].epss",
        ".matches[].vulnerability.risk",
        ".matches[].vulnerability.cvss[].metrics.baseScore",
        ".matches[].vulnerability.fix.state",
        ".matches[].vulnerability.fix.versions",
        ".source.target.manifestDigest",
    ] {
        assert!(
            by_document["grype"].contains(needed),
            "the SQL does not read {needed}"
        );
    }
    for doc in ["inventory", "change", "failure"] {
        assert!(
            by_document.contains_key(doc),
            "no SQL reads the {doc} records"
        );
    }
    // The article's KEV bug: grype writes no `kev` key.
    assert!(
        !reads.iter().any(|r| r.path.ends_with(".kev")),
        "a `kev` key is read; grype's is knownExploited"
    );
}

#[test]
fn a_path_missing_from_the_samples_is_reported() {
    let stmt = Statement {
        line: 7,
        text: "SELECT r.scan:matches, mt.value:vulnerability.kev::BOOLEAN, x.other:a \
               FROM scans_raw r, LATERAL FLATTEN(input => r.scan:matches) mt"
            .into(),
    };
    let mut unknown = Vec::new();
    let reads = json_reads("t.sql", &stmt, &mut unknown);
    let paths: Vec<&str> = reads.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [".matches", ".matches[].vulnerability.kev", ".matches"],
        "{reads:?}"
    );
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    let known = paths_of(&grype_samples());
    assert!(known.contains(".matches[].vulnerability.knownExploited"));
    assert!(!known.contains(".matches[].vulnerability.kev"));
}

// ---------------------------------------------------------------------------------------
// The dashboard reads what the views define

/// The output columns of `SELECT` list `items` (upper case, as Snowflake returns them).
fn projection_names(items: &[sqlparser::ast::SelectItem], view: &str) -> Vec<String> {
    use sqlparser::ast::{Expr, SelectItem};
    items
        .iter()
        .map(|item| match item {
            SelectItem::ExprWithAlias { alias, .. } => alias.value.to_uppercase(),
            SelectItem::UnnamedExpr(Expr::Identifier(id)) => id.value.to_uppercase(),
            SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => {
                parts.last().unwrap().value.to_uppercase()
            }
            other => panic!("view {view}: column {other} has no name the dashboard could use"),
        })
        .collect()
}

/// Every view the SQL creates, with its columns where its first SELECT names them.
fn view_columns() -> BTreeMap<String, Option<Vec<String>>> {
    use sqlparser::ast::{SetExpr, Statement as Ast};
    let mut views = BTreeMap::new();
    for file in sql_files() {
        let text = substitute(&std::fs::read_to_string(&file).unwrap());
        for stmt in split(&text) {
            let Ok(parsed) = Parser::parse_sql(&SnowflakeDialect {}, &stmt.text) else {
                continue;
            };
            for ast in parsed {
                let Ast::CreateView(view) = ast else { continue };
                let name = view.name.to_string().to_lowercase();
                let mut body = view.query.body.as_ref();
                while let SetExpr::SetOperation { left, .. } = body {
                    body = left.as_ref();
                }
                let columns = match body {
                    SetExpr::Select(select)
                        if !select.projection.iter().any(|i| {
                            matches!(
                                i,
                                sqlparser::ast::SelectItem::Wildcard(_)
                                    | sqlparser::ast::SelectItem::QualifiedWildcard(..)
                            )
                        }) =>
                    {
                        Some(projection_names(&select.projection, &name))
                    }
                    _ => None,
                };
                views.insert(name, columns);
            }
        }
    }
    views
}

/// A Python list of column names in the dashboard, e.g. `FINDING_COLUMNS = [...]`.
fn dashboard_list(app: &str, name: &str) -> Vec<String> {
    let list = Regex::new(&format!(r"(?s)\n{name} = \[(.*?)\]")).unwrap();
    let item = Regex::new(r#""([A-Z_]+)""#).unwrap();
    let body = list
        .captures(app)
        .unwrap_or_else(|| panic!("streamlit/streamlit_app.py has no {name}"))[1]
        .to_string();
    item.captures_iter(&body)
        .map(|c| c[1].to_string())
        .collect()
}

#[test]
fn the_dashboard_queries_views_the_sql_defines_with_the_columns_they_have() {
    let app = std::fs::read_to_string(repo().join("streamlit/streamlit_app.py")).unwrap();
    let views = view_columns();
    for expected in [
        "scans",
        "scan_results",
        "scans_latest",
        "scan_results_latest",
        "image_tags_current",
        "scan_results_enriched",
        "image_summary",
        "vulnerability_changes",
        "monitor_failed_scans",
        "monitor_not_rescanned_since_db_update",
        "monitor_tags_moved_last_day",
    ] {
        assert!(
            views.contains_key(expected),
            "no view {expected} in sql/: {views:?}"
        );
    }
    let queried: BTreeSet<String> = Regex::new(r#""SELECT \* FROM (\w+)""#)
        .unwrap()
        .captures_iter(&app)
        .map(|c| c[1].to_lowercase())
        .collect();
    assert_eq!(
        queried,
        BTreeSet::from([
            "scan_results_enriched".to_string(),
            "image_summary".to_string(),
            "vulnerability_changes".to_string()
        ]),
        "the views the dashboard queries"
    );
    for (view, list) in [
        ("scan_results_enriched", "FINDING_COLUMNS"),
        ("image_summary", "IMAGE_COLUMNS"),
        ("vulnerability_changes", "CHANGE_COLUMNS"),
    ] {
        let sql = views[view]
            .clone()
            .unwrap_or_else(|| panic!("view {view} selects *: name its columns"));
        assert_eq!(
            dashboard_list(&app, list),
            sql,
            "streamlit_app.py {list} against the columns of view {view}"
        );
    }
}
