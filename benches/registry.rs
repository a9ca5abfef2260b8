//! The large-registry benchmark (issue 7): a real Debian `docker-registry` on loopback,
//! filled with synthetic repositories, watched by the release binary, side by side with
//! the alternatives. Run it with `scripts/bench` (or `scripts/bench --quick`); it writes
//! `docs/performance.md`. It is a measurement, not a test: nothing here asserts a time.
//!
//! What one run does:
//! 1. Writes the registry's filesystem storage directly (blobs, revision, tag and layer
//!    links): `--repos` × `--tags` tiny images sharing one config and one layer blob,
//!    each tag with its own manifest (a per-tag annotation gives each a distinct digest).
//! 2. Drives `spcs-image-scanner once` (the release binary, `--bin`) with
//!    `benches/standin/scanner-standin-for-bench` as syft and grype (a counting stand-in,
//!    not a scanner) through: a first cycle that learns the registry, idle cycles (no
//!    change), a cycle with 1% of tags moved, and, on a subset, a full scan of every image
//!    against a DB re-match from cached SBOMs.
//! 3. Peers: the article's approach (scan every image every cycle: a fresh state each
//!    cycle, as `spec/job.yaml` runs), and an operator's `skopeo list-tags` +
//!    `skopeo inspect --raw` loop over the same registry.
//! 4. Growth: the idle cycle at each `--growth` size (the registry grows in place).
//!
//! Requests come from the registry's own access log (`TestRegistry::requests`), peak
//! RSS from `VmHWM` in `/proc/<pid>/status` polled while the process runs, scanner
//! invocations from the stand-in's `invocations.log`.

#[allow(dead_code)]
#[path = "../tests/support/registry.rs"]
mod registry;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use registry::{LoggedRequest, RegistryOptions, TestRegistry};
use sha2::{Digest as _, Sha256};

/// User-Agent prefix of the daemon's registry requests.
const DAEMON_UA: &str = "spcs-image-scanner/";
/// Entries per catalog / tags page the daemon asks for (`src/registry/mod.rs`).
const DAEMON_PAGE_SIZE: usize = 1000;
/// Targets from issue 7.
const TARGET_SPEEDUP_VS_SKOPEO: f64 = 20.0;
const TARGET_RSS_MIB: f64 = 64.0;
/// Bound on one `once` run (a wait, not a timing assertion).
const ONCE_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone)]
struct Options {
    repos: usize,
    tags: usize,
    growth: Vec<usize>,
    peer_subset: usize,
    skopeo_tags: Option<usize>,
    idle_repeats: usize,
    concurrency: usize,
    /// Tags at which one idle cycle runs under callgrind (0 = no profile).
    profile_tags: usize,
    bin: PathBuf,
    out: PathBuf,
    command: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: registry [--quick] [--repos N] [--tags N] [--growth N,N,...] [--peer-subset TAGS]\n\
         \x20               [--skopeo-tags TAGS] [--idle-repeats N] [--concurrency N] [--profile-tags N]\n\
         \x20               [--bin PATH] [--out FILE]"
    );
    std::process::exit(64)
}

fn parse_options() -> Options {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Options {
        repos: if quick { 20 } else { 200 },
        tags: 50,
        growth: if quick {
            vec![500, 1000]
        } else {
            vec![1000, 5000, 10000, 20000]
        },
        peer_subset: if quick { 200 } else { 1000 },
        skopeo_tags: None,
        idle_repeats: 3,
        concurrency: 2,
        profile_tags: if quick { 1000 } else { 10000 },
        bin: root.join("target/release/spcs-image-scanner"),
        out: root.join("docs/performance.md"),
        command: std::env::var("BENCH_COMMAND")
            .unwrap_or_else(|_| format!("cargo bench --bench registry -- {}", args.join(" "))),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        let number = |s: String| s.parse::<usize>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--quick" | "--bench" => {}
            "--repos" => o.repos = number(value()),
            "--tags" => o.tags = number(value()),
            "--growth" => {
                o.growth = value()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--peer-subset" => o.peer_subset = number(value()),
            "--skopeo-tags" => o.skopeo_tags = Some(number(value())),
            "--idle-repeats" => o.idle_repeats = number(value()).max(1),
            "--concurrency" => o.concurrency = number(value()).max(1),
            "--profile-tags" => o.profile_tags = number(value()),
            "--bin" => o.bin = PathBuf::from(value()),
            "--out" => o.out = PathBuf::from(value()),
            _ => usage(),
        }
    }
    if o.repos == 0 || o.tags == 0 {
        usage();
    }
    o
}

// ---------------------------------------------------------------------------------------
// Registry storage, written directly (pushing 10,000 manifests over HTTP is slow).
// ---------------------------------------------------------------------------------------

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

struct Storage {
    v2: PathBuf,
    config: (String, usize),
    layer: (String, usize),
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Storage {
    fn new(registry: &TestRegistry) -> Storage {
        let v2 = registry.storage_root().join("docker/registry/v2");
        let mut s = Storage {
            v2,
            config: (String::new(), 0),
            layer: (String::new(), 0),
        };
        // One shared config and one shared layer (an empty tar, gzipped).
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"]},"config":{}}"#;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &[0u8; 1024]).expect("gzip");
        let layer = gz.finish().expect("gzip");
        s.config = (s.write_blob(config), config.len());
        s.layer = (s.write_blob(&layer), layer.len());
        s
    }

    fn write_blob(&self, bytes: &[u8]) -> String {
        let hex = sha256_hex(bytes);
        let dir = self.v2.join("blobs/sha256").join(&hex[..2]).join(&hex);
        std::fs::create_dir_all(&dir).expect("create blob dir");
        std::fs::write(dir.join("data"), bytes).expect("write blob");
        hex
    }

    fn link(path: &Path, hex: &str) {
        std::fs::create_dir_all(path).expect("create link dir");
        std::fs::write(path.join("link"), format!("sha256:{hex}")).expect("write link");
    }

    fn manifest(&self, repo: &str, tag: &str, revision: usize) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{}","size":{}}}],"annotations":{{"org.example.bench.image":"{repo}:{tag}","org.example.bench.revision":"{revision}"}}}}"#,
            self.config.0, self.config.1, self.layer.0, self.layer.1
        )
        .into_bytes()
    }

    /// Creates `repo` with `tags` tags, each pointing at its own manifest.
    fn add_repository(&self, repo: &str, tags: usize) {
        let base = self.v2.join("repositories").join(repo);
        for hex in [&self.config.0, &self.layer.0] {
            Self::link(&base.join("_layers/sha256").join(hex), hex);
        }
        for t in 0..tags {
            self.put_tag(repo, &tag_name(t), 0);
        }
    }

    /// Points `repo:tag` at the manifest of `revision` (a new digest), as a push would.
    fn put_tag(&self, repo: &str, tag: &str, revision: usize) {
        let base = self.v2.join("repositories").join(repo).join("_manifests");
        let hex = self.write_blob(&self.manifest(repo, tag, revision));
        Self::link(&base.join("revisions/sha256").join(&hex), &hex);
        let tag_dir = base.join("tags").join(tag);
        Self::link(&tag_dir.join("index/sha256").join(&hex), &hex);
        // The tag's current link last, written by rename so a reader never sees half.
        let current = tag_dir.join("current");
        std::fs::create_dir_all(&current).expect("create current dir");
        let tmp = current.join("link.tmp");
        std::fs::write(&tmp, format!("sha256:{hex}")).expect("write link");
        std::fs::rename(&tmp, current.join("link")).expect("rename link");
    }
}

fn repo_name(i: usize) -> String {
    format!("bench/r{i:05}")
}

fn tag_name(i: usize) -> String {
    format!("t{i:04}")
}

// ---------------------------------------------------------------------------------------
// The daemon under test, with its stand-in scanner.
// ---------------------------------------------------------------------------------------

struct Setup {
    dir: tempfile::TempDir,
    bin: PathBuf,
    registry_url: String,
    repositories: Vec<String>,
    concurrency: usize,
}

#[derive(Debug, Clone, Default)]
struct Run {
    code: Option<i32>,
    wall: Duration,
    /// User + system CPU time of the process and the children it waited for.
    cpu: Duration,
    /// CPU time the registry process spent meanwhile (answering this run, mostly).
    registry_cpu: Duration,
    hwm_kib: u64,
    summary: serde_json::Value,
    invocations: usize,
    syft: usize,
    grype: usize,
    requests: Vec<LoggedRequest>,
    stdout_tail: String,
}

impl Run {
    fn field(&self, key: &str) -> u64 {
        self.summary.get(key).and_then(|v| v.as_u64()).unwrap_or(0)
    }
    fn cycle_ms(&self) -> u64 {
        self.field("duration_ms")
    }
    fn rss_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
    fn daemon_requests(&self) -> RequestCounts {
        RequestCounts::of(
            self.requests
                .iter()
                .filter(|r| r.user_agent_starts_with(DAEMON_UA)),
        )
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct RequestCounts {
    total: usize,
    catalog: usize,
    tag_lists: usize,
    heads: usize,
    manifest_gets: usize,
    other: usize,
}

impl RequestCounts {
    fn of<'a>(requests: impl Iterator<Item = &'a LoggedRequest>) -> RequestCounts {
        let mut c = RequestCounts::default();
        for r in requests {
            c.total += 1;
            let path = r.path.split('?').next().unwrap_or(&r.path);
            if path == "/v2/_catalog" || path.ends_with("/_catalog") {
                c.catalog += 1;
            } else if path.ends_with("/tags/list") {
                c.tag_lists += 1;
            } else if r.is_manifest("HEAD") {
                c.heads += 1;
            } else if r.is_manifest("GET") {
                c.manifest_gets += 1;
            } else {
                c.other += 1;
            }
        }
        c
    }
}

impl Setup {
    fn new(opts: &Options, registry: &TestRegistry, repositories: Vec<String>) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("spcs-bench-")
            .tempdir()
            .expect("temp dir");
        let standin =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/standin/scanner-standin-for-bench");
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).expect("tools dir");
        for name in ["syft-standin-for-bench", "grype-standin-for-bench"] {
            std::os::unix::fs::symlink(&standin, tools.join(name)).expect("link stand-in");
        }
        let s = Setup {
            dir,
            bin: opts.bin.clone(),
            registry_url: registry.url(),
            repositories,
            concurrency: opts.concurrency,
        };
        // A DB built a day ago: fresh for the default vulndb.max_age (120h).
        s.set_db_built(chrono::Utc::now() - chrono::Duration::days(1));
        s
    }

    fn tools(&self) -> PathBuf {
        self.dir.path().join("tools")
    }

    /// What the stand-in reports as its DB build; a new value is a DB change.
    fn set_db_built(&self, at: chrono::DateTime<chrono::Utc>) {
        std::fs::write(
            self.tools().join("db_built"),
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
        .expect("write db_built");
    }

    fn invocations(&self) -> (usize, usize) {
        let text =
            std::fs::read_to_string(self.tools().join("invocations.log")).unwrap_or_default();
        let syft = text.lines().filter(|l| l.starts_with("syft ")).count();
        let grype = text.lines().filter(|l| l.starts_with("grype ")).count();
        (syft, grype)
    }

    fn write_config(&self) -> PathBuf {
        let d = self.dir.path();
        let repositories = if self.repositories.is_empty() {
            String::new()
        } else {
            format!(
                "repositories = [{}]\n",
                self.repositories
                    .iter()
                    .map(|r| format!("{r:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let text = format!(
            "[registry]\nurl = {url:?}\nauth = \"none\"\n{repositories}\
             [schedule]\ncron = \"0 0 0 1 1 *\"\n\
             [scanner]\nsyft = {syft:?}\ngrype = {grype:?}\nconcurrency = {conc}\ntimeout = \"120s\"\n\
             [vulndb]\ncache_dir = {db:?}\nupdate_cron = \"\"\n\
             [state]\ndir = {state:?}\n[output]\ndir = {output:?}\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n[api]\nlisten = \"\"\n",
            url = self.registry_url,
            syft = self
                .tools()
                .join("syft-standin-for-bench")
                .display()
                .to_string(),
            grype = self
                .tools()
                .join("grype-standin-for-bench")
                .display()
                .to_string(),
            conc = self.concurrency,
            db = d.join("grype-db").display().to_string(),
            state = d.join("state").display().to_string(),
            output = d.join("output").display().to_string(),
        );
        let path = d.join("scanner.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Runs `once` to its end, measuring wall time, peak RSS, requests and invocations.
    async fn once(&self, registry: &TestRegistry) -> Run {
        self.once_under(registry, None).await
    }

    /// [`Setup::once`], under `valgrind --tool=callgrind` writing to `callgrind_out` when
    /// given (then wall time and RSS are valgrind's, not the daemon's).
    async fn once_under(&self, registry: &TestRegistry, callgrind_out: Option<&Path>) -> Run {
        let config = self.write_config();
        let (syft0, grype0) = self.invocations();
        let mark = registry.wait_for_log_quiet().await;
        let cpu0 = children_cpu();
        let registry_cpu0 = process_cpu(registry.pid());
        let started = Instant::now();
        let mut command = match callgrind_out {
            Some(out) => {
                let mut c = Command::new("valgrind");
                c.arg("--tool=callgrind")
                    .arg(format!("--callgrind-out-file={}", out.display()))
                    .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let mut child = command
            .arg("--config")
            .arg(&config)
            .arg("once")
            .env_remove("RUST_LOG")
            .env_remove("SPCS_IMAGE_SCANNER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let pid = child.id();
        let hwm = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let poller = {
            let (hwm, done) = (hwm.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Some(kib) = vm_hwm_kib(pid) {
                        hwm.fetch_max(kib, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + ONCE_TIMEOUT;
        let status = loop {
            match child.try_wait().expect("wait for once") {
                Some(status) => break status,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    break child.wait().expect("wait after kill");
                }
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        let wall = started.elapsed();
        let cpu = children_cpu().saturating_sub(cpu0);
        let registry_cpu = process_cpu(registry.pid()).saturating_sub(registry_cpu0);
        done.store(true, Ordering::Relaxed);
        let _ = poller.join();
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        let summary = stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .rfind(|v| v.get("message").and_then(|m| m.as_str()) == Some("cycle finished"))
            .unwrap_or(serde_json::Value::Null);
        let requests = registry.requests_since_settled(mark).await;
        let (syft1, grype1) = self.invocations();
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(8)..].join("\n")
        };
        let run = Run {
            code: status.code(),
            wall,
            cpu,
            registry_cpu,
            hwm_kib: hwm.load(Ordering::Relaxed),
            summary,
            invocations: (syft1 - syft0) + (grype1 - grype0),
            syft: syft1 - syft0,
            grype: grype1 - grype0,
            requests,
            stdout_tail: format!("{}\n{}", tail(&stdout), tail(&stderr)),
        };
        if run.code != Some(0) || run.summary.is_null() {
            eprintln!(
                "[bench] warning: `once` exited {:?}{}; last output:\n{}",
                run.code,
                if run.summary.is_null() {
                    " without a cycle summary"
                } else {
                    ""
                },
                run.stdout_tail
            );
        }
        run
    }
}

/// CPU time (user + system) of this process's waited-for children so far. The benchmark
/// runs one child at a time, so the difference around a run is that run's.
fn children_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let Ok(u) = getrusage(UsageWho::RUSAGE_CHILDREN) else {
        return Duration::ZERO;
    };
    let d = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    d(u.user_time()) + d(u.system_time())
}

/// utime + stime of a running process, from `/proc/<pid>/stat` (clock ticks of 10 ms).
fn process_cpu(pid: Option<u32>) -> Duration {
    let Some(pid) = pid else {
        return Duration::ZERO;
    };
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // rest starts at field 3 (state); utime is field 14, stime 15.
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// The operator's skopeo loop.
// ---------------------------------------------------------------------------------------

struct SkopeoRun {
    wall: Duration,
    /// CPU time of the skopeo processes.
    cpu: Duration,
    /// CPU time of the registry meanwhile.
    registry_cpu: Duration,
    repos: usize,
    tags: usize,
    failures: usize,
    requests: RequestCounts,
}

async fn skopeo_loop(registry: &TestRegistry, repos: &[String], max_tags: usize) -> SkopeoRun {
    let mark = registry.wait_for_log_quiet().await;
    let host = registry.host();
    let cpu0 = children_cpu();
    let registry_cpu0 = process_cpu(registry.pid());
    let started = Instant::now();
    let (mut tags_done, mut repos_done, mut failures) = (0, 0, 0);
    'outer: for repo in repos {
        let out = Command::new("skopeo")
            .args(["list-tags", "--tls-verify=false"])
            .arg(format!("docker://{host}/{repo}"))
            .output()
            .expect("run skopeo list-tags (scripts/bench installs skopeo)");
        repos_done += 1;
        let tags: Vec<String> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                v.get("Tags")?.as_array().map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_else(|| {
                failures += 1;
                Vec::new()
            });
        for tag in tags {
            if tags_done >= max_tags {
                break 'outer;
            }
            let status = Command::new("skopeo")
                .args(["inspect", "--raw", "--tls-verify=false"])
                .arg(format!("docker://{host}/{repo}:{tag}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run skopeo inspect");
            if !status.success() {
                failures += 1;
            }
            tags_done += 1;
        }
    }
    let wall = started.elapsed();
    let cpu = children_cpu().saturating_sub(cpu0);
    let registry_cpu = process_cpu(registry.pid()).saturating_sub(registry_cpu0);
    let requests = registry.requests_since_settled(mark).await;
    SkopeoRun {
        wall,
        cpu,
        registry_cpu,
        repos: repos_done,
        tags: tags_done,
        failures,
        requests: RequestCounts::of(
            requests
                .iter()
                .filter(|r| r.user_agent_starts_with("skopeo")),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// The profile: one idle cycle under callgrind (instruction counts, stable on a busy machine).
// ---------------------------------------------------------------------------------------

/// One idle cycle's instruction profile, summarised from `callgrind_annotate`.
struct Profile {
    tags: usize,
    run: Run,
    total_ir: u64,
    /// Every function by its own instructions, highest first: (Ir, function, object).
    exclusive: Vec<(u64, String, String)>,
    /// Top project functions (`spcs_image_scanner::`) by inclusive instructions.
    inclusive: Vec<(u64, String)>,
}

/// sled's thread pool spins in `Lazy::deref` while it starts its threads; under valgrind,
/// which runs one thread at a time, that spin lasts whole time slices and its count
/// changes from run to run. It is left out of the figures (and shown on its own).
fn is_startup_spin(function: &str) -> bool {
    function.starts_with("<sled::lazy::Lazy<") && function.ends_with(">::deref")
}

impl Profile {
    /// Instructions in sled's start-up spin.
    fn spin(&self) -> u64 {
        self.exclusive
            .iter()
            .filter(|(_, f, _)| is_startup_spin(f))
            .map(|(ir, _, _)| ir)
            .sum()
    }

    /// Instructions without the spin.
    fn work(&self) -> u64 {
        self.total_ir - self.spin()
    }

    /// Own instructions by crate (first path segment) or shared library, highest first.
    fn by_crate(&self) -> Vec<(String, u64)> {
        let mut crates: BTreeMap<String, u64> = BTreeMap::new();
        for (ir, f, obj) in self
            .exclusive
            .iter()
            .filter(|(_, f, _)| !is_startup_spin(f))
        {
            *crates.entry(crate_of(f, obj)).or_default() += ir;
        }
        let mut v: Vec<(String, u64)> = crates.into_iter().collect();
        v.sort_by_key(|(_, ir)| std::cmp::Reverse(*ir));
        v
    }

    /// Own instructions by function name.
    fn by_function(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (ir, f, _) in self
            .exclusive
            .iter()
            .filter(|(_, f, _)| !is_startup_spin(f))
        {
            *m.entry(f.clone()).or_default() += ir;
        }
        m
    }
}

/// `callgrind_annotate` lines: `1,234 (12.34%)  file:function [object]`.
fn annotate(out: &Path, inclusive: bool) -> Vec<(u64, String, String)> {
    let text = Command::new("callgrind_annotate")
        .arg("--threshold=100")
        .arg(format!(
            "--inclusive={}",
            if inclusive { "yes" } else { "no" }
        ))
        .arg(out)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut rows = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        let Some((count, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(ir) = count.replace(',', "").parse::<u64>() else {
            continue;
        };
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('(') {
            Some(r) => r.split_once(')').map_or(r, |(_, after)| after).trim_start(),
            None => rest,
        };
        if rest.starts_with("PROGRAM TOTALS") {
            rows.push((ir, "PROGRAM TOTALS".to_string(), String::new()));
            continue;
        }
        let (site, object) = match rest.rsplit_once(" [") {
            Some((site, obj)) => (site, obj.trim_end_matches(']')),
            None => (rest, ""),
        };
        rows.push((ir, function_of(site), object.to_string()));
    }
    rows
}

/// `file:function` → `function` (a file name has no `::`; a Rust path has).
fn function_of(site: &str) -> String {
    let bytes = site.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b':' && bytes.get(i + 1) != Some(&b':') && (i == 0 || bytes[i - 1] != b':') {
            return site[i + 1..].to_string();
        }
    }
    site.to_string()
}

/// The crate a Rust function belongs to (`<sled::Tree as ..>::get` → `sled`), or the
/// shared library's file name for C code.
fn crate_of(function: &str, object: &str) -> String {
    let f = function.trim_start_matches(['<', '&', '*', '(']);
    let f = f
        .trim_start_matches("mut ")
        .trim_start_matches("dyn ")
        .trim_start_matches(['<', '&']);
    match f.split_once("::") {
        Some((head, _)) if !head.is_empty() && !head.contains([' ', '<', '>', '(']) => {
            head.to_string()
        }
        _ => Path::new(object)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "(unknown)".into()),
    }
}

impl Setup {
    /// One more idle cycle, under callgrind; `None` if valgrind is missing or failed.
    async fn profile(&self, registry: &TestRegistry, tags: usize) -> Option<Profile> {
        let out = self.dir.path().join("callgrind.out");
        let run = self.once_under(registry, Some(&out)).await;
        if run.code != Some(0) || !out.is_file() {
            log("callgrind run failed; no profile");
            return None;
        }
        // Kept for `callgrind_annotate --tree=caller` or kcachegrind.
        let kept = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/bench")
            .join(format!("callgrind-idle-{tags}.out"));
        if std::fs::create_dir_all(kept.parent().expect("parent")).is_ok()
            && std::fs::copy(&out, &kept).is_ok()
        {
            log(format!("callgrind output kept at {}", kept.display()));
        }
        let own = annotate(&out, false);
        let total_ir = own
            .iter()
            .find(|(_, f, _)| f == "PROGRAM TOTALS")
            .map(|(ir, _, _)| *ir)?;
        let own: Vec<_> = own
            .into_iter()
            .filter(|(_, f, _)| f != "PROGRAM TOTALS")
            .collect();
        let inclusive = annotate(&out, true)
            .into_iter()
            .filter(|(_, f, _)| f.contains("spcs_image_scanner::"))
            .map(|(ir, f, _)| (ir, f))
            .take(15)
            .collect();
        Some(Profile {
            tags,
            run,
            total_ir,
            exclusive: own,
            inclusive,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The run.
// ---------------------------------------------------------------------------------------

struct GrowthRow {
    tags: usize,
    repos: usize,
    learn: Run,
    idle: Vec<Run>,
}

impl GrowthRow {
    /// The idle run with the median process wall time.
    fn idle_median(&self) -> &Run {
        let mut order: Vec<&Run> = self.idle.iter().collect();
        order.sort_by_key(|r| r.wall);
        order[order.len() / 2]
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn log(msg: impl AsRef<str>) {
    eprintln!(
        "[bench {}] {}",
        chrono::Utc::now().format("%H:%M:%S"),
        msg.as_ref()
    );
}

fn machine() -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "nproc",
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into()),
    );
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "?".into());
    m.insert("memory", mem);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "?".into());
    m.insert("cpu", model);
    m.insert("kernel", read_trim("/proc/sys/kernel/osrelease"));
    m
}

/// One-minute load average under which the machine counts as quiet.
const QUIET_LOAD: f64 = 0.5;

fn one_minute_load(loadavg: &str) -> f64 {
    loadavg
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(f64::MAX)
}

/// Waits (at most 3 minutes) for the one-minute load average to fall under
/// [`QUIET_LOAD`], e.g. after a build; returns `/proc/loadavg` as it then is.
fn wait_for_quiet_machine() -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let load = read_trim("/proc/loadavg");
        if one_minute_load(&load) < QUIET_LOAD || Instant::now() >= deadline {
            return load;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn tool_version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let opts = parse_options();
    assert!(
        opts.bin.is_file(),
        "{} not found: build it first (`cargo build --release`; scripts/bench does)",
        opts.bin.display()
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run(opts));
}

async fn run(opts: Options) {
    let bench_started = Instant::now();
    let load_before = wait_for_quiet_machine();
    let main_tags = opts.repos * opts.tags;
    let mut sizes: Vec<usize> = opts.growth.clone();
    sizes.push(main_tags);
    sizes.sort_unstable();
    sizes.dedup();
    for &size in &sizes {
        assert!(
            size % opts.tags == 0 && size > 0,
            "growth size {size} is not a multiple of --tags {}",
            opts.tags
        );
    }
    log(format!(
        "main size {} repositories x {} tags = {main_tags}; growth sizes {sizes:?}",
        opts.repos, opts.tags
    ));

    let registry =
        TestRegistry::start(RegistryOptions::anonymous().with_blob_descriptor_cache()).await;
    let storage = Storage::new(&registry);
    let ours = Setup::new(&opts, &registry, Vec::new());
    let mut filled_repos = 0;
    let mut rows: Vec<GrowthRow> = Vec::new();
    let mut moved: Option<(usize, Run)> = None;
    let mut skopeo: Option<SkopeoRun> = None;
    let mut article: Option<(usize, Run)> = None;
    let mut rematch: Option<Run> = None;
    let mut fill_times = Vec::new();
    let mut profiles: Vec<Profile> = Vec::new();

    for &size in &sizes {
        let repos = size / opts.tags;
        let t = Instant::now();
        for r in filled_repos..repos {
            storage.add_repository(&repo_name(r), opts.tags);
        }
        fill_times.push((repos - filled_repos, t.elapsed()));
        filled_repos = repos;
        log(format!("{size} tags in storage; learning cycle"));
        let learn = ours.once(&registry).await;
        log(format!(
            "learned in {:.1}s ({} scanner invocations); idle cycles",
            secs(learn.wall),
            learn.invocations
        ));
        let mut idle = Vec::new();
        for _ in 0..opts.idle_repeats {
            idle.push(ours.once(&registry).await);
        }
        let row = GrowthRow {
            tags: size,
            repos,
            learn,
            idle,
        };
        log(format!(
            "idle at {size}: {:.2}s, {} requests, {:.1} MiB",
            secs(row.idle_median().wall),
            row.idle_median().daemon_requests().total,
            row.idle_median().rss_mib()
        ));
        rows.push(row);
        if opts.profile_tags > 0 && (size == opts.profile_tags || size == sizes[0]) {
            log(format!("idle cycle at {size} tags under callgrind"));
            if let Some(p) = ours.profile(&registry, size).await {
                profiles.push(p);
            }
        }

        if size == main_tags {
            // (c) 1% of tags moved: every 100th tag points at a new manifest.
            let total = main_tags;
            let count = (total / 100).max(1);
            let step = total / count;
            for k in 0..count {
                let i = k * step;
                storage.put_tag(&repo_name(i / opts.tags), &tag_name(i % opts.tags), 1);
            }
            log(format!("moved {count} tags; cycle"));
            let run = ours.once(&registry).await;
            moved = Some((count, run));

            // Peer (b): the operator's skopeo loop over the same registry.
            let names: Vec<String> = (0..opts.repos).map(repo_name).collect();
            let limit = opts.skopeo_tags.unwrap_or(main_tags).min(main_tags);
            log(format!("skopeo loop over {limit} tags"));
            skopeo = Some(skopeo_loop(&registry, &names, limit).await);

            // Peer (a) and the DB re-match, on a subset: a fresh state every cycle is the
            // article's approach (spec/job.yaml); then a DB change re-matches the same
            // images from their cached SBOMs.
            let subset_repos = (opts.peer_subset / opts.tags).clamp(1, opts.repos);
            let subset: Vec<String> = (0..subset_repos).map(repo_name).collect();
            let peer = Setup::new(&opts, &registry, subset);
            log(format!(
                "article's approach: full scan of {} tags with a fresh state",
                subset_repos * opts.tags
            ));
            let full = peer.once(&registry).await;
            peer.set_db_built(chrono::Utc::now() - chrono::Duration::hours(2));
            log("DB change: re-match of the same images from cached SBOMs");
            let rm = peer.once(&registry).await;
            article = Some((subset_repos * opts.tags, full));
            rematch = Some(rm);
        }
    }
    let load_after = read_trim("/proc/loadavg");
    let total = bench_started.elapsed();
    let doc = render(
        &opts,
        &Rendered {
            rows: &rows,
            moved: moved.as_ref(),
            skopeo: skopeo.as_ref(),
            article: article.as_ref(),
            rematch: rematch.as_ref(),
            fill_times: &fill_times,
            profiles: &profiles,
            load_before: &load_before,
            load_after: &load_after,
            total,
            main_tags,
        },
    );
    if let Some(parent) = opts.out.parent() {
        std::fs::create_dir_all(parent).expect("create docs dir");
    }
    std::fs::write(&opts.out, &doc).expect("write performance report");
    println!("{doc}");
    log(format!(
        "wrote {} in {:.0}s",
        opts.out.display(),
        secs(total)
    ));
}

struct Rendered<'a> {
    rows: &'a [GrowthRow],
    moved: Option<&'a (usize, Run)>,
    skopeo: Option<&'a SkopeoRun>,
    article: Option<&'a (usize, Run)>,
    rematch: Option<&'a Run>,
    fill_times: &'a [(usize, Duration)],
    profiles: &'a [Profile],
    load_before: &'a str,
    load_after: &'a str,
    total: Duration,
    main_tags: usize,
}

fn yes(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**NOT met**" }
}

fn render(opts: &Options, r: &Rendered) -> String {
    let mut d = String::new();
    let main = r
        .rows
        .iter()
        .find(|row| row.tags == r.main_tags)
        .expect("the main size was measured");
    let idle = main.idle_median();
    let idle_req = idle.daemon_requests();
    let machine = machine();
    let w = &mut d;

    let _ = writeln!(w, "# Performance\n");
    let _ = writeln!(
        w,
        "Generated by `benches/registry.rs` (run `{}`); every figure below is measured in that \
         run and this file is rewritten by it: do not edit it by hand.\n",
        opts.command
    );
    let _ = writeln!(
        w,
        "Set-up: a real Debian `docker-registry` on loopback (its access log on, for counting \
         requests; the in-memory blob descriptor cache of Debian's default config), its \
         filesystem storage written directly with {} repositories × {} tags = {} tags (tiny OCI images sharing one config \
         and one layer blob; each tag has its own manifest, so every tag has a distinct digest). \
         The daemon is the release binary (`{}`), run as `spcs-image-scanner once` with the state \
         of the previous cycle, `scanner.concurrency = {}`, `registry.concurrency` at its default. \
         syft and grype are `benches/standin/scanner-standin-for-bench`, a counting stand-in \
         that writes minimal valid syft-json / grype-json documents (it is not a scanner): the \
         scanner's own cost is left out, the watcher's is measured. Requests are counted from the \
         registry's access log, peak RSS is `VmHWM` of the daemon process (polled every 5 ms), \
         wall time is the whole `once` process (start-up, store open and check, the cycle, exit); \
         \"cycle\" is the daemon's own `duration_ms` from its `cycle finished` line; \
         \"CPU\" is the daemon's user + system time (with the stand-in scanners it ran), \
         \"registry's CPU\" the registry process's meanwhile: the registry \
         and the daemon share the machine's cores.\n",
        opts.repos,
        opts.tags,
        r.main_tags,
        opts.bin.display(),
        opts.concurrency,
    );
    let _ = writeln!(
        w,
        "**Machine load**: {} (`/proc/loadavg` before the run `{}`, after it `{}`; the run \
         itself keeps both cores busy). Ratios compare runs of the same benchmark on the same \
         machine minutes apart; request and invocation counts do not depend on load.\n",
        if one_minute_load(r.load_before) < QUIET_LOAD {
            "the machine was quiet when the run started"
        } else {
            "other work was running when the run started (it did not settle within 3 minutes), \
             so times may be high"
        },
        r.load_before,
        r.load_after
    );
    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "| | |\n|---|---|");
    for (k, v) in &machine {
        let _ = writeln!(w, "| {k} | {v} |");
    }
    let _ = writeln!(
        w,
        "| docker-registry | {} |",
        tool_version("/usr/bin/docker-registry", &["--version"])
    );
    let _ = writeln!(w, "| skopeo | {} |", tool_version("skopeo", &["--version"]));
    let _ = writeln!(w, "| benchmark wall time | {:.0} s |\n", secs(r.total));

    // ---- main table
    let _ = writeln!(w, "## Ours at {} tags\n", r.main_tags);
    let _ = writeln!(
        w,
        "| cycle | wall (s) | cycle (s) | CPU (s) | registry's CPU (s) | registry requests | of which HEAD / GET manifest / catalog / tags list / other | scanner invocations (syft + grype) | peak RSS (MiB) | exit |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|");
    let row = |w: &mut String, name: &str, run: &Run| {
        let c = run.daemon_requests();
        let _ = writeln!(
            w,
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} / {} / {} / {} / {} | {} ({} + {}) | {:.1} | {:?} |",
            secs(run.wall),
            run.cycle_ms() as f64 / 1000.0,
            secs(run.cpu),
            secs(run.registry_cpu),
            c.total,
            c.heads,
            c.manifest_gets,
            c.catalog,
            c.tag_lists,
            c.other,
            run.invocations,
            run.syft,
            run.grype,
            run.rss_mib(),
            run.code.unwrap_or(-1)
        );
    };
    if let Some(first) = r.rows.first() {
        row(
            w,
            &format!(
                "first cycle, learns {} tags (empty state; full scans with the stand-in)",
                first.tags
            ),
            &first.learn,
        );
    }
    if main.tags != r.rows.first().map_or(0, |f| f.tags) {
        row(
            w,
            &format!(
                "learning cycle growing the registry to {} tags (new tags only)",
                main.tags
            ),
            &main.learn,
        );
    }
    for (i, run) in main.idle.iter().enumerate() {
        row(w, &format!("idle (no change), run {}", i + 1), run);
    }
    if let Some((count, run)) = r.moved {
        row(w, &format!("{count} tags moved (1%)"), run);
    }
    let _ = writeln!(
        w,
        "\nOn the median idle run the daemon used {:.2} s of CPU ({:.0} µs per tag) and the \
         registry answering it {:.2} s ({:.0} µs per tag), over {:.2} s of wall time on {} cores.\n",
        secs(idle.cpu),
        secs(idle.cpu) * 1e6 / r.main_tags as f64,
        secs(idle.registry_cpu),
        secs(idle.registry_cpu) * 1e6 / r.main_tags as f64,
        secs(idle.wall),
        machine.get("nproc").map_or("?", String::as_str)
    );

    // ---- peers
    let _ = writeln!(w, "## Peers\n");
    let idle_wall = secs(idle.wall);
    let mut skopeo_ratio = None;
    if let Some(s) = r.skopeo {
        let per_tag = secs(s.wall) / s.tags.max(1) as f64;
        let projected = per_tag * r.main_tags as f64;
        let ratio = projected / idle_wall;
        skopeo_ratio = Some(ratio);
        let _ = writeln!(
            w,
            "**Operator's script** (`skopeo list-tags --tls-verify=false docker://HOST/REPO` per \
             repository, then `skopeo inspect --raw --tls-verify=false docker://HOST/REPO:TAG` per \
             tag, one after the other, {}): {} repositories, {} tags in {:.1} s \
             ({:.1} ms per tag{}; skopeo's CPU {:.1} s, the registry's {:.1} s), {} registry \
             requests ({:.2} per tag: skopeo pings `/v2/` on every invocation), {} failed \
             invocations.{}\n",
            tool_version("skopeo", &["--version"]),
            s.repos,
            s.tags,
            secs(s.wall),
            per_tag * 1000.0,
            if s.tags < r.main_tags {
                format!(
                    "; {:.1} s projected linearly to {} tags",
                    projected, r.main_tags
                )
            } else {
                String::new()
            },
            secs(s.cpu),
            secs(s.registry_cpu),
            s.requests.total,
            s.requests.total as f64 / s.tags.max(1) as f64,
            s.failures,
            if s.tags < r.main_tags {
                " Measured on a subset (`--skopeo-tags`)."
            } else {
                ""
            },
        );
    }
    let mut article_line = None;
    if let Some((n, full)) = r.article {
        let per_tag = secs(full.wall) / *n as f64;
        let projected = per_tag * r.main_tags as f64;
        article_line = Some((projected, per_tag));
        let _ = writeln!(
            w,
            "**The article's approach** (scan every image every cycle: a fresh state each cycle, \
             as `spec/job.yaml` runs `once`), measured on a subset of {n} tags with the same \
             stand-in: {:.1} s, {} scanner invocations ({} syft + {} grype), {} registry requests; \
             {:.1} ms per tag, {:.0} s and {} invocations per cycle projected linearly to {} tags. \
             Every cycle costs this, changed or not.\n",
            secs(full.wall),
            full.invocations,
            full.syft,
            full.grype,
            full.daemon_requests().total,
            per_tag * 1000.0,
            projected,
            2 * r.main_tags,
            r.main_tags
        );
    }
    let _ = writeln!(w, "| | ours, idle cycle | peer | ours / peer |");
    let _ = writeln!(w, "|---|---:|---:|---:|");
    if let Some(s) = r.skopeo {
        let projected = secs(s.wall) / s.tags.max(1) as f64 * r.main_tags as f64;
        let _ = writeln!(
            w,
            "| wall time vs skopeo loop, {} tags (s) | {:.2} | {:.1}{} | {:.4} ({:.1}× faster) |",
            r.main_tags,
            idle_wall,
            projected,
            if s.tags < r.main_tags {
                " (projected)"
            } else {
                ""
            },
            idle_wall / projected,
            projected / idle_wall
        );
        let peer_req = s.requests.total as f64 / s.tags.max(1) as f64 * r.main_tags as f64;
        let _ = writeln!(
            w,
            "| registry requests vs skopeo loop | {} | {:.0} | {:.3} |",
            idle_req.total,
            peer_req,
            idle_req.total as f64 / peer_req
        );
        // CPU per tag: less sensitive to what else the machine does than wall time.
        let per_tag_us = |d: Duration, tags: usize| secs(d) * 1e6 / tags.max(1) as f64;
        let (ours_cpu, peer_cpu) = (per_tag_us(idle.cpu, r.main_tags), per_tag_us(s.cpu, s.tags));
        let _ = writeln!(
            w,
            "| client CPU per tag vs skopeo (µs) | {ours_cpu:.0} | {peer_cpu:.0} | {:.4} |",
            ours_cpu / peer_cpu.max(f64::MIN_POSITIVE)
        );
        let (ours_reg, peer_reg) = (
            per_tag_us(idle.registry_cpu, r.main_tags),
            per_tag_us(s.registry_cpu, s.tags),
        );
        let _ = writeln!(
            w,
            "| registry CPU per tag vs skopeo (µs) | {ours_reg:.0} | {peer_reg:.0} | {:.3} |",
            ours_reg / peer_reg.max(f64::MIN_POSITIVE)
        );
    }
    if let Some((projected, _)) = article_line {
        let _ = writeln!(
            w,
            "| wall time vs the article's every-cycle scan (s) | {:.2} | {:.1} (projected) | {:.4} ({:.1}× faster) |",
            idle_wall,
            projected,
            idle_wall / projected,
            projected / idle_wall
        );
        let _ = writeln!(
            w,
            "| scanner invocations per cycle vs the article's | {} | {} | {} |",
            idle.invocations,
            2 * r.main_tags,
            if idle.invocations == 0 {
                "0".to_string()
            } else {
                format!("{:.4}", idle.invocations as f64 / (2 * r.main_tags) as f64)
            }
        );
    }
    let _ = writeln!(w);
    if let Some(s) = r.skopeo {
        // The registry's CPU per request of ours bounds any client's idle cycle here.
        let cores: f64 = machine
            .get("nproc")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1.0);
        let floor = secs(idle.registry_cpu) / cores;
        let skopeo_total = secs(s.wall) / s.tags.max(1) as f64 * r.main_tags as f64;
        let _ = writeln!(
            w,
            "What bounds the idle cycle here is the registry, not the daemon: answering its \
             {} requests took the registry {:.2} s of CPU against the daemon's {:.2} s. Spread \
             over {cores:.0} cores, the registry's share alone needs {floor:.2} s of wall time, \
             so on this machine no client making one request per tag could finish an idle cycle \
             faster than that, {:.1}× faster than the skopeo loop at best; ours took {:.2} s. \
             skopeo's own cost is the other way round: {:.1} ms of CPU per tag in skopeo \
             processes, against {:.0} µs in the daemon.\n",
            idle_req.total,
            secs(idle.registry_cpu),
            secs(idle.cpu),
            skopeo_total / floor.max(f64::MIN_POSITIVE),
            secs(idle.wall),
            secs(s.cpu) * 1e3 / s.tags.max(1) as f64,
            secs(idle.cpu) * 1e6 / r.main_tags as f64
        );
    }

    // ---- DB re-match
    if let (Some((n, full)), Some(rm)) = (r.article, r.rematch) {
        let _ = writeln!(
            w,
            "## DB change: re-match from cached SBOMs vs full rescans\n"
        );
        let _ = writeln!(
            w,
            "The same {n} images (the subset above): a full scan of each (syft + grype, as a \
             full rescan does) against a re-match after the stand-in DB's build changed (grype \
             on the SBOM cached in `state.dir/sboms/`, no registry traffic for the images).\n"
        );
        let _ = writeln!(
            w,
            "| | wall (s) | cycle (s) | syft | grype | registry requests | images re-matched | peak RSS (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (name, run) in [("full scans", full), ("re-match after DB change", rm)] {
            let _ = writeln!(
                w,
                "| {name} | {:.2} | {:.2} | {} | {} | {} | {} | {:.1} |",
                secs(run.wall),
                run.cycle_ms() as f64 / 1000.0,
                run.syft,
                run.grype,
                run.daemon_requests().total,
                run.field("rematched"),
                run.rss_mib()
            );
        }
        let _ = writeln!(
            w,
            "\nRe-match / full scan: {:.2} of the time, {} of {} syft runs. With the stand-in, \
             syft costs as little as grype; with the real syft (pulling and unpacking every \
             image) the saving is far larger.\n",
            secs(rm.wall) / secs(full.wall),
            rm.syft,
            full.syft
        );
    }

    // ---- growth
    let _ = writeln!(w, "## Growth: the idle cycle as the registry grows\n");
    let _ = writeln!(
        w,
        "The registry grows in place ({} tags per repository); at each size the new tags are \
         learned, then {} idle cycles run; the median (by wall time) is shown.\n",
        opts.tags, opts.idle_repeats
    );
    let _ = writeln!(
        w,
        "| tags | repositories | idle wall (s) | idle cycle (s) | wall per tag (µs) | cycle per tag (µs) | requests | requests per tag | peak RSS (MiB) | RSS per 1k tags (MiB) | scanner invocations | learning: new tags, wall (s), invocations |"
    );
    let _ = writeln!(
        w,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let mut prev_tags = 0;
    for row in r.rows {
        let i = row.idle_median();
        let c = i.daemon_requests();
        let _ = writeln!(
            w,
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {:.3} | {:.1} | {:.2} | {} | {}, {:.1}, {} |",
            row.tags,
            row.repos,
            secs(i.wall),
            i.cycle_ms() as f64 / 1000.0,
            secs(i.wall) * 1e6 / row.tags as f64,
            i.cycle_ms() as f64 * 1000.0 / row.tags as f64,
            c.total,
            c.total as f64 / row.tags as f64,
            i.rss_mib(),
            i.rss_mib() * 1000.0 / row.tags as f64,
            i.invocations,
            row.tags - prev_tags,
            secs(row.learn.wall),
            row.learn.invocations
        );
        prev_tags = row.tags;
    }
    let (first, last) = (&r.rows[0], &r.rows[r.rows.len() - 1]);
    let per_tag = |row: &GrowthRow| secs(row.idle_median().wall) / row.tags as f64;
    let cycle_per_tag = |row: &GrowthRow| row.idle_median().cycle_ms() as f64 / row.tags as f64;
    let _ = writeln!(
        w,
        "\nFrom {} to {} tags ({:.0}× more): wall per tag × {:.2}, cycle per tag × {:.2}, requests \
         per tag × {:.3}, peak RSS × {:.2} (RSS has a fixed base: the process, its runtime, sled's \
         cache).\n",
        first.tags,
        last.tags,
        last.tags as f64 / first.tags as f64,
        per_tag(last) / per_tag(first),
        cycle_per_tag(last) / cycle_per_tag(first).max(f64::MIN_POSITIVE),
        (last.idle_median().daemon_requests().total as f64 / last.tags as f64)
            / (first.idle_median().daemon_requests().total as f64 / first.tags as f64),
        last.idle_median().rss_mib() / first.idle_median().rss_mib().max(f64::MIN_POSITIVE)
    );

    // ---- profile
    render_profile(w, opts, r.profiles);

    // ---- targets
    let _ = writeln!(w, "## Targets (issue 7), checked from the figures above\n");
    let catalog_pages = r.main_tags.div_ceil(opts.tags).div_ceil(DAEMON_PAGE_SIZE);
    let tag_pages = (r.main_tags / opts.tags) * opts.tags.div_ceil(DAEMON_PAGE_SIZE);
    let allowed = r.main_tags + catalog_pages + tag_pages;
    let req_ok = !idle.requests.is_empty()
        && main.idle.iter().all(|run| {
            let c = run.daemon_requests();
            c.total <= allowed
                && c.heads <= r.main_tags
                && c.catalog <= catalog_pages
                && c.tag_lists <= tag_pages
        });
    let worst = main
        .idle
        .iter()
        .map(|run| run.daemon_requests().total)
        .max()
        .unwrap_or(0);
    let max_rss = main.idle.iter().map(Run::rss_mib).fold(0.0, f64::max);
    let idle_inv = main.idle.iter().map(|run| run.invocations).sum::<usize>();
    let all_ok = main.idle.iter().all(|run| run.code == Some(0));
    let _ = writeln!(w, "| target | measured | |\n|---|---|---|");
    let _ = writeln!(
        w,
        "| idle cycle over {} tags: at most one request per tag plus the catalog and tag-list pages ({} + {} + {} = {}) | at most {} requests in {} idle runs ({} HEAD, {} manifest GET, {} catalog, {} tags list, {} other in the median run) | {} |",
        r.main_tags,
        r.main_tags,
        catalog_pages,
        tag_pages,
        allowed,
        worst,
        main.idle.len(),
        idle_req.heads,
        idle_req.manifest_gets,
        idle_req.catalog,
        idle_req.tag_lists,
        idle_req.other,
        yes(req_ok && all_ok)
    );
    match skopeo_ratio {
        Some(ratio) => {
            let _ = writeln!(
                w,
                "| at least {TARGET_SPEEDUP_VS_SKOPEO:.0}× faster than the skopeo loop | {ratio:.1}× (idle `once` wall time, start-up included){} | {} |",
                if r.skopeo.is_some_and(|s| s.tags < r.main_tags) {
                    ", skopeo loop projected from a subset"
                } else {
                    ""
                },
                yes(ratio >= TARGET_SPEEDUP_VS_SKOPEO)
            );
        }
        None => {
            let _ = writeln!(
                w,
                "| at least 20× faster than the skopeo loop | not measured | **NOT met** |"
            );
        }
    }
    let _ = writeln!(
        w,
        "| peak RSS at most {TARGET_RSS_MIB:.0} MiB (idle cycle, {} tags) | {max_rss:.1} MiB (highest of {} idle runs) | {} |",
        r.main_tags,
        main.idle.len(),
        yes(max_rss > 0.0 && max_rss <= TARGET_RSS_MIB)
    );
    let _ = writeln!(
        w,
        "| zero scanner invocations on an idle cycle | {idle_inv} in {} idle runs | {} |",
        main.idle.len(),
        yes(idle_inv == 0 && all_ok)
    );
    let growth_idle_inv: usize = r
        .rows
        .iter()
        .flat_map(|row| row.idle.iter())
        .map(|run| run.invocations)
        .sum();
    let _ = writeln!(
        w,
        "| (growth) zero scanner invocations on every idle cycle at every size | {growth_idle_inv} | {} |",
        yes(growth_idle_inv == 0)
    );
    if let Some((count, run)) = r.moved {
        let _ = writeln!(
            w,
            "| (1% moved) one full scan per moved tag | {} syft + {} grype for {count} moved tags | {} |",
            run.syft,
            run.grype,
            yes(run.syft == *count && run.grype == *count)
        );
    }
    let _ = writeln!(
        w,
        "\nStorage written directly: {}.",
        r.fill_times
            .iter()
            .map(|(n, t)| format!("{n} repositories in {:.1} s", secs(*t)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    d
}

fn render_profile(w: &mut String, opts: &Options, profiles: &[Profile]) {
    let _ = writeln!(w, "## Profile of the idle cycle\n");
    let Some(p) = profiles.iter().find(|p| p.tags == opts.profile_tags) else {
        let _ = writeln!(
            w,
            "Not measured in this run (`--profile-tags {}` is not one of the sizes, or valgrind \
             failed).\n",
            opts.profile_tags
        );
        return;
    };
    let c = p.run.daemon_requests();
    let _ = writeln!(
        w,
        "One more idle `once` at {} tags under `valgrind --tool=callgrind` (instruction counts: \
         repeatable for the same binary and input whatever the machine's load). The whole \
         process, start-up included: **{} instructions**, {:.0} per tag, for {} registry requests \
         ({} HEAD). Left out of that figure and of the tables: {} instructions that sled's \
         thread pool spent spinning in `Lazy::deref` while it started its threads; valgrind \
         runs one thread at a time, so that spin lasts whole time slices there and varies from \
         run to run, while on the machine it lasts as long as starting a few threads. The \
         release binary keeps its symbols but has no line tables, so Rust functions show \
         without a file; the raw output is kept in `target/bench/callgrind-idle-<tags>.out`.\n",
        p.tags,
        group(p.work()),
        p.work() as f64 / p.tags as f64,
        c.total,
        c.heads,
        group(p.spin())
    );
    let pct = |ir: u64| 100.0 * ir as f64 / p.work().max(1) as f64;
    let _ = writeln!(w, "Own instructions by crate or library (top 12):\n");
    let _ = writeln!(
        w,
        "| crate / library | instructions | share |\n|---|---:|---:|"
    );
    for (name, ir) in p.by_crate().iter().take(12) {
        let _ = writeln!(w, "| `{name}` | {} | {:.1}% |", group(*ir), pct(*ir));
    }
    let _ = writeln!(w, "\nTop 15 functions by own instructions:\n");
    let _ = writeln!(w, "| function | instructions | share |\n|---|---:|---:|");
    for (ir, f, obj) in p
        .exclusive
        .iter()
        .filter(|(_, f, _)| !is_startup_spin(f))
        .take(15)
    {
        let name = if f.contains("::") || obj.is_empty() {
            f.clone()
        } else {
            format!(
                "{f} ({})",
                Path::new(obj)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )
        };
        let _ = writeln!(
            w,
            "| `{}` | {} | {:.1}% |",
            cell(&name),
            group(*ir),
            pct(*ir)
        );
    }
    let _ = writeln!(
        w,
        "\nThe daemon's own functions by inclusive instructions (what they and their callees \
         cost; async functions show as their `{{{{closure}}}}`):\n"
    );
    let _ = writeln!(w, "| function | instructions | share |\n|---|---:|---:|");
    for (ir, f) in &p.inclusive {
        let _ = writeln!(w, "| `{}` | {} | {:.1}% |", cell(f), group(*ir), pct(*ir));
    }
    let _ = writeln!(w);

    // The cost of one more tag: the difference between two sizes.
    let Some(small) = profiles.iter().find(|q| q.tags < p.tags) else {
        return;
    };
    let added = (p.tags - small.tags) as f64;
    let per_tag_total = (p.work() as f64 - small.work() as f64) / added;
    let _ = writeln!(
        w,
        "### What one more tag costs\n\nThe same profile at {} tags, subtracted from the one at \
         {} tags and divided by the {} tags between them, so that fixed costs (start-up, \
         configuration, the vulnerability DB check) cancel. **{:.0} instructions per tag** \
         ({} at {} tags, {} at {}).\n",
        small.tags,
        p.tags,
        p.tags - small.tags,
        per_tag_total,
        group(small.work()),
        small.tags,
        group(p.work()),
        p.tags
    );
    let diff = |big: Vec<(String, u64)>, little: BTreeMap<String, u64>| {
        let mut v: Vec<(String, f64)> = big
            .into_iter()
            .map(|(k, ir)| {
                let before = little.get(&k).copied().unwrap_or(0);
                (k, (ir as f64 - before as f64) / added)
            })
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    };
    let crates = diff(p.by_crate(), small.by_crate().into_iter().collect());
    let _ = writeln!(
        w,
        "| crate / library | instructions per tag | share |\n|---|---:|---:|"
    );
    for (name, ir) in crates.iter().take(10) {
        let _ = writeln!(
            w,
            "| `{name}` | {ir:.0} | {:.1}% |",
            100.0 * ir / per_tag_total.max(1.0)
        );
    }
    let functions = diff(p.by_function().into_iter().collect(), small.by_function());
    let _ = writeln!(
        w,
        "\n| function | instructions per tag | share |\n|---|---:|---:|"
    );
    for (name, ir) in functions.iter().take(15) {
        let _ = writeln!(
            w,
            "| `{}` | {ir:.0} | {:.1}% |",
            cell(name),
            100.0 * ir / per_tag_total.max(1.0)
        );
    }
    let _ = writeln!(w);
}

/// A function name fit for a table cell: bounded, no pipes or backticks.
fn cell(s: &str) -> String {
    let s: String = s.replace('|', "\\|").replace('`', "'");
    if s.chars().count() > 140 {
        format!("{}…", s.chars().take(140).collect::<String>())
    } else {
        s
    }
}

/// 1234567 → "1,234,567".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
