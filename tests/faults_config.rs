//! Broken configurations through the real binary (issue 6, item 8): for each broken
//! config, `check-config` and `once` exit 64 with a message on stderr naming the config
//! file and the key at fault, and nothing was created for a config that failed (no state
//! dir, no output dir, no file of any kind next to the config).
//!
//! `src/config.rs` has unit tests for the parser; these prove the binary's behaviour:
//! the exit code, what the operator reads, and that validation happens before anything
//! touches the disk or the network.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::daemon::tree;

/// One broken config: the text of the file (from the valid base), the environment, and
/// what stderr must name.
struct Case {
    name: &'static str,
    /// Returns the file's text given the base sections.
    text: fn(&Base) -> String,
    env: &'static [(&'static str, &'static str)],
    /// The dotted key stderr must name.
    key: &'static str,
    /// Further text stderr must hold (what is wrong).
    also: &'static [&'static str],
    /// Text stderr must not hold (a secret from the URL).
    never: &'static [&'static str],
}

/// The parts of a valid config, so each case changes exactly one thing.
struct Base {
    registry: String,
    schedule: String,
    scanner: String,
    state: String,
    output: String,
    rest: String,
}

impl Base {
    fn new(root: &Path) -> Base {
        Base {
            registry: "url = \"http://127.0.0.1:1\"\nauth = \"none\"\nrequest_timeout = \"2s\"\nmax_retries = 0\n".into(),
            schedule: "cron = \"0 0 0 1 1 *\"\n".into(),
            scanner: "syft = \"/bin/true\"\ngrype = \"\"\nconcurrency = 1\n".into(),
            state: format!("dir = {:?}\n", root.join("state").display().to_string()),
            output: format!("dir = {:?}\n", root.join("output").display().to_string()),
            rest: "[vulndb]\nupdate_cron = \"\"\n[log]\nformat = \"json\"\n[api]\nlisten = \"\"\n".into(),
        }
    }

    fn with(&self, registry: &str, schedule: &str, scanner: &str, extra: &str) -> String {
        format!(
            "{extra}\n[registry]\n{}{registry}\n[schedule]\n{}{schedule}\n[scanner]\n{}{scanner}\n[state]\n{}[output]\n{}{}",
            self.registry, self.schedule, self.scanner, self.state, self.output, self.rest
        )
    }

    fn valid(&self) -> String {
        self.with("", "", "", "")
    }
}

/// Replaces `key = ...` in `section_text` (the base's own line for that key) by `line`.
fn replace_line(section_text: &str, key: &str, line: &str) -> String {
    section_text
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{key} ")) {
                line.to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn with_registry(b: &Base, key: &str, line: &str) -> String {
    let registry = replace_line(&b.registry, key, line);
    let b2 = Base {
        registry,
        schedule: b.schedule.clone(),
        scanner: b.scanner.clone(),
        state: b.state.clone(),
        output: b.output.clone(),
        rest: b.rest.clone(),
    };
    b2.valid()
}

fn with_scanner(b: &Base, key: &str, line: &str) -> String {
    let scanner = replace_line(&b.scanner, key, line);
    let b2 = Base {
        registry: b.registry.clone(),
        schedule: b.schedule.clone(),
        scanner,
        state: b.state.clone(),
        output: b.output.clone(),
        rest: b.rest.clone(),
    };
    b2.valid()
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "a cron expression that is not one",
            text: |b| {
                b.valid()
                    .replace("cron = \"0 0 0 1 1 *\"", "cron = \"every five minutes\"")
            },
            env: &[],
            key: "schedule.cron",
            also: &["every five minutes"],
            never: &[],
        },
        Case {
            name: "a cron field out of range (second 61)",
            text: |b| {
                b.valid()
                    .replace("cron = \"0 0 0 1 1 *\"", "cron = \"61 * * * * *\"")
            },
            env: &[],
            key: "schedule.cron",
            also: &[],
            never: &[],
        },
        Case {
            name: "an unknown top-level key",
            text: |b| b.with("", "", "", "colour = \"blue\""),
            env: &[],
            key: "colour",
            also: &["unknown"],
            never: &[],
        },
        Case {
            name: "an unknown top-level section",
            text: |b| b.with("", "", "", "[scannr]\nconcurrency = 2"),
            env: &[],
            key: "scannr",
            also: &["unknown"],
            never: &[],
        },
        Case {
            name: "an unknown nested key (registry.urls)",
            text: |b| b.with("urls = [\"http://127.0.0.1:2\"]\n", "", "", ""),
            env: &[],
            key: "urls",
            also: &["unknown"],
            never: &[],
        },
        Case {
            name: "scanner.concurrency = 0",
            text: |b| with_scanner(b, "concurrency", "concurrency = 0"),
            env: &[],
            key: "scanner.concurrency",
            also: &["0"],
            never: &[],
        },
        Case {
            name: "scanner.concurrency = -3",
            text: |b| with_scanner(b, "concurrency", "concurrency = -3"),
            env: &[],
            key: "scanner.concurrency",
            also: &["-3"],
            never: &[],
        },
        Case {
            name: "registry.concurrency = 0",
            text: |b| b.with("concurrency = 0\n", "", "", ""),
            env: &[],
            key: "registry.concurrency",
            also: &[],
            never: &[],
        },
        Case {
            name: "registry.concurrency = -1",
            text: |b| b.with("concurrency = -1\n", "", "", ""),
            env: &[],
            key: "registry.concurrency",
            also: &[],
            never: &[],
        },
        Case {
            name: "auth = spcs with a token file that does not exist",
            text: |b| {
                with_registry(
                    b,
                    "auth",
                    "auth = \"spcs\"\ntoken_file = \"/nonexistent/snowflake/session/token\"",
                )
            },
            env: &[],
            key: "registry.token_file",
            also: &["/nonexistent/snowflake/session/token"],
            never: &[],
        },
        Case {
            name: "auth = basic with a password file that does not exist",
            text: |b| {
                with_registry(
                    b,
                    "auth",
                    "auth = \"basic\"\nusername = \"u\"\npassword_file = \"/nonexistent/password\"",
                )
            },
            env: &[],
            key: "registry.password_file",
            also: &["/nonexistent/password"],
            never: &[],
        },
        Case {
            name: "registry.url without a scheme",
            text: |b| with_registry(b, "url", "url = \"127.0.0.1:5000\""),
            env: &[],
            key: "registry.url",
            also: &[],
            never: &[],
        },
        Case {
            name: "registry.url with a path",
            text: |b| with_registry(b, "url", "url = \"http://127.0.0.1:5000/v2/team\""),
            env: &[],
            key: "registry.url",
            also: &["path"],
            never: &[],
        },
        Case {
            name: "registry.url with credentials in it",
            text: |b| {
                with_registry(
                    b,
                    "url",
                    "url = \"http://scanner:hunter2-secret@127.0.0.1:5000\"",
                )
            },
            env: &[],
            key: "registry.url",
            also: &["credentials"],
            never: &["hunter2-secret"],
        },
        Case {
            name: "registry.url with an ftp scheme",
            text: |b| with_registry(b, "url", "url = \"ftp://127.0.0.1:5000\""),
            env: &[],
            key: "registry.url",
            also: &["ftp"],
            never: &[],
        },
        Case {
            name: "plain http to a non-loopback host without allow_insecure_http",
            text: |b| with_registry(b, "url", "url = \"http://registry.example.com:5000\""),
            env: &[],
            key: "registry.url",
            also: &["allow_insecure_http"],
            never: &[],
        },
        Case {
            name: "a duration that is not one (scanner.timeout = ten minutes)",
            text: |b| b.with("", "", "timeout = \"ten minutes\"\n", ""),
            env: &[],
            key: "scanner.timeout",
            also: &["ten minutes"],
            never: &[],
        },
        Case {
            name: "a zero duration (registry.request_timeout = 0s)",
            text: |b| with_registry(b, "request_timeout", "request_timeout = \"0s\""),
            env: &[],
            key: "registry.request_timeout",
            also: &[],
            never: &[],
        },
        Case {
            name: "a duration of the wrong type (rescan.window = 30)",
            text: |b| b.valid() + "[rescan]\nwindow = 30\n",
            env: &[],
            key: "rescan.window",
            also: &[],
            never: &[],
        },
        Case {
            name: "a platform without an architecture (linux)",
            text: |b| b.with("platform = \"linux\"\n", "", "", ""),
            env: &[],
            key: "registry.platform",
            also: &["linux"],
            never: &[],
        },
        Case {
            name: "a platform with too many parts (linux/arm/v7/extra)",
            text: |b| b.with("platform = \"linux/arm/v7/extra\"\n", "", "", ""),
            env: &[],
            key: "registry.platform",
            also: &[],
            never: &[],
        },
        Case {
            name: "a glob that does not parse (registry.include)",
            text: |b| b.with("include = [\"team/[unclosed\"]\n", "", "", ""),
            env: &[],
            key: "registry.include",
            also: &["[unclosed"],
            never: &[],
        },
        Case {
            name: "a tag glob that does not parse (registry.tags_exclude)",
            text: |b| b.with("tags_exclude = [\"{a,b\"]\n", "", "", ""),
            env: &[],
            key: "registry.tags_exclude",
            also: &[],
            never: &[],
        },
        Case {
            name: "an env override with a value that is not a number",
            text: Base::valid,
            env: &[("SCANNER__SCANNER__CONCURRENCY", "lots")],
            key: "scanner.concurrency",
            also: &["SCANNER__SCANNER__CONCURRENCY", "lots"],
            never: &[],
        },
        Case {
            name: "an env override with a number out of range",
            text: Base::valid,
            env: &[("SCANNER__SCANNER__CONCURRENCY", "0")],
            key: "scanner.concurrency",
            also: &[],
            never: &[],
        },
        Case {
            name: "an env override with a bad cron",
            text: Base::valid,
            env: &[("SCANNER__SCHEDULE__CRON", "whenever")],
            key: "schedule.cron",
            also: &["whenever"],
            never: &[],
        },
        Case {
            name: "an env override of an unknown key",
            text: Base::valid,
            env: &[("SCANNER__REGISTRY__PASSWORD", "x")],
            key: "registry.password",
            also: &["SCANNER__REGISTRY__PASSWORD", "unknown"],
            never: &[],
        },
        Case {
            name: "an env override with a bad boolean",
            text: Base::valid,
            env: &[("SCANNER__REGISTRY__ALLOW_INSECURE_HTTP", "yes please")],
            key: "registry.allow_insecure_http",
            also: &["yes please"],
            never: &[],
        },
        Case {
            name: "an env override with a bad URL",
            text: Base::valid,
            env: &[(
                "SCANNER__REGISTRY__URL",
                "http://u:env-secret-pw@127.0.0.1:5000",
            )],
            key: "registry.url",
            also: &["credentials"],
            never: &["env-secret-pw"],
        },
    ]
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` (bounded: a broken config must fail at once, so 60 s is
/// generous), with exactly the given override variables.
fn run(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars() {
        if name.starts_with("SCANNER__")
            || name == "SPCS_IMAGE_SCANNER_CONFIG"
            || name == "RUST_LOG"
        {
            cmd.env_remove(name);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn the binary");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{args:?} did not finish within 60 s\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

#[test]
fn the_valid_base_config_is_accepted_so_each_case_breaks_exactly_one_thing() {
    let root = tempfile::tempdir().expect("temp dir");
    let config = root.path().join("scanner.toml");
    std::fs::write(&config, Base::new(root.path()).valid()).expect("write config");
    let out = run(&config, &["check-config"], &[]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(": OK"), "{}", out.stdout);
}

#[test]
fn each_broken_config_exits_64_naming_the_file_and_the_key_and_creates_nothing() {
    let cases = cases();
    let mut runs = 0;
    // Every case is run and every miss reported together, not only the first.
    let mut misses: Vec<String> = Vec::new();
    macro_rules! check {
        ($cond:expr, $($arg:tt)+) => {
            if !$cond {
                misses.push(format!($($arg)+));
            }
        };
    }
    for case in &cases {
        let root = tempfile::tempdir().expect("temp dir");
        let base = Base::new(root.path());
        let config = root.path().join("scanner.toml");
        std::fs::write(&config, (case.text)(&base)).expect("write config");
        let before = tree(root.path());
        for command in ["check-config", "once"] {
            let out = run(&config, &[command], case.env);
            runs += 1;
            let context = format!(
                "case {:?}, `{command}`\nconfig:\n{}\nstdout:\n{}\nstderr:\n{}",
                case.name,
                std::fs::read_to_string(&config).unwrap_or_default(),
                out.stdout,
                out.stderr
            );
            check!(
                out.code == Some(64),
                "exit {:?}, not 64: {context}",
                out.code
            );
            check!(
                out.stderr.contains(&config.display().to_string()),
                "stderr names the config file: {context}"
            );
            check!(
                out.stderr.contains(case.key),
                "stderr names the key {:?}: {context}",
                case.key
            );
            for (var, _) in case.env {
                check!(
                    out.stderr.contains(var),
                    "stderr names the variable {var}: {context}"
                );
            }
            for text in case.also {
                check!(
                    out.stderr.contains(text),
                    "stderr holds {text:?}: {context}"
                );
            }
            for secret in case.never {
                check!(
                    !out.stderr.contains(secret) && !out.stdout.contains(secret),
                    "{secret:?} must never be printed: {context}"
                );
            }
            check!(
                !out.stdout.contains(": OK"),
                "nothing claims the config is fine: {context}"
            );
            let after = tree(root.path());
            check!(
                after == before,
                "nothing created for a config that failed, got {:?}: {context}",
                after.difference(&before).collect::<Vec<_>>()
            );
        }
        if !misses.is_empty() {
            continue;
        }
        support::reliability::record(support::reliability::Tried {
            area: "config",
            fault: &format!("config with {}", case.name),
            runs: 2,
            outcome: &format!(
                "check-config and once exit 64 naming the file and `{}`; no state or output created",
                case.key
            ),
            lost: 0,
            test: "faults_config::each_broken_config_exits_64_naming_the_file_and_the_key_and_creates_nothing",
        });
    }
    assert!(
        misses.is_empty(),
        "{} misses:\n\n{}",
        misses.len(),
        misses.join("\n\n")
    );
    assert_eq!(runs, cases.len() * 2);
}
