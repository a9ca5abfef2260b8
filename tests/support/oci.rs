//! Building small, deterministic Debian-like OCI images in memory and pushing
//! them (plus indexes, cosign-style signatures and OCI 1.1 artifacts) to a
//! registry over the distribution API.
//!
//! Used by integration tests (`mod support;`) and by example programs
//! (`#[path = "../tests/support/oci.rs"] mod oci;`), so it depends only on
//! `flate2`, `tar`, `sha2`, `hex`, `reqwest`, `rustls` (for its `ring` crypto
//! provider, see [`install_crypto_provider`]) and `serde_json`.
//!
//! A [`DebianImage`] becomes one gzip layer holding `etc/os-release`
//! (Debian 11 bullseye) and `var/lib/dpkg/status` listing its packages, which
//! is enough for syft to report `deb` packages and distro `debian 11`. The tar
//! and gzip streams are deterministic (sorted entries, fixed mtimes, owner
//! root, gzip mtime 0), so the same inputs always give the same digests.
//!
//! [`Pusher`] sends every request with the User-Agent
//! [`PUSHER_USER_AGENT`], so registry logs can tell its traffic apart from the
//! daemon's (`spcs-image-scanner/...`).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::time::Duration;

use flate2::Compression;
use flate2::GzBuilder;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, LOCATION};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// User-Agent of every request made by [`Pusher`].
pub const PUSHER_USER_AGENT: &str = "spcs-image-scanner-tests/pusher";

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const COSIGN_SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// The `os-release` written into every [`DebianImage`].
pub const DEBIAN_11_OS_RELEASE: &str = "PRETTY_NAME=\"Debian GNU/Linux 11 (bullseye)\"\n\
NAME=\"Debian GNU/Linux\"\n\
VERSION_ID=\"11\"\n\
VERSION=\"11 (bullseye)\"\n\
VERSION_CODENAME=bullseye\n\
ID=debian\n";

/// Modification time of every tar entry (2023-11-14T22:13:20Z).
const FIXED_MTIME: u64 = 1_700_000_000;

/// Every accepted manifest media type, for `Accept` headers.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Error from building or pushing; the message names the URL and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciError(pub String);

impl fmt::Display for OciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OciError {}

pub type OciResult<T> = Result<T, OciError>;

fn err<T>(message: impl Into<String>) -> OciResult<T> {
    Err(OciError(message.into()))
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Installs rustls' `ring` crypto provider as the process default, if none
/// is installed yet. The project builds reqwest with `rustls-no-provider`, so
/// every `reqwest::Client` (even for plain `http://`) panics without one.
/// Idempotent; [`Pusher::new`] and [`http_client`] call it.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A reqwest client with `user_agent` (crypto provider installed first).
pub fn http_client(user_agent: &str) -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .user_agent(user_agent)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build reqwest client")
}

/// Which family of media types a single-platform image uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// OCI image manifest / config / `tar+gzip` layer.
    Oci,
    /// Docker schema2 manifest / container config / `diff.tar.gzip` layer.
    DockerV2,
}

impl ManifestFormat {
    pub fn manifest_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Oci => OCI_MANIFEST,
            ManifestFormat::DockerV2 => DOCKER_MANIFEST,
        }
    }

    pub fn config_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Oci => OCI_CONFIG,
            ManifestFormat::DockerV2 => DOCKER_CONFIG,
        }
    }

    pub fn layer_media_type(self) -> &'static str {
        match self {
            ManifestFormat::Oci => OCI_LAYER_GZIP,
            ManifestFormat::DockerV2 => DOCKER_LAYER_GZIP,
        }
    }
}

/// A minimal Debian 11 root filesystem with a dpkg database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianImage {
    /// Debian/OCI architecture name: `amd64` or `arm64`.
    pub arch: String,
    /// `(package, version)` pairs written to `var/lib/dpkg/status`.
    pub packages: Vec<(String, String)>,
    /// Extra files `(path, contents)`; paths are relative to `/` (a leading
    /// `/` is stripped). An extra file replaces a generated one at the same
    /// path (e.g. a custom `etc/os-release`).
    pub extra_files: Vec<(String, Vec<u8>)>,
}

impl Default for DebianImage {
    /// amd64 with `zlib1g 1:1.2.11.dfsg-2` (source `zlib`).
    fn default() -> Self {
        Self::new("amd64")
    }
}

impl DebianImage {
    /// An image for `arch` with the default package `zlib1g 1:1.2.11.dfsg-2`.
    pub fn new(arch: &str) -> Self {
        Self {
            arch: arch.to_string(),
            packages: vec![("zlib1g".to_string(), "1:1.2.11.dfsg-2".to_string())],
            extra_files: Vec::new(),
        }
    }

    /// Replaces the package list.
    pub fn with_packages(mut self, packages: &[(&str, &str)]) -> Self {
        self.packages = packages
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        self
    }

    /// Adds (or replaces) one package.
    pub fn with_package(mut self, name: &str, version: &str) -> Self {
        self.packages.retain(|(n, _)| n != name);
        self.packages.push((name.to_string(), version.to_string()));
        self
    }

    /// Adds an extra file.
    pub fn with_file(mut self, path: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.extra_files.push((path.to_string(), contents.into()));
        self
    }

    /// The `var/lib/dpkg/status` text.
    pub fn dpkg_status(&self) -> String {
        let mut packages = self.packages.clone();
        packages.sort();
        let mut out = String::new();
        for (name, version) in &packages {
            let multi_arch = if name.starts_with("lib") || name == "zlib1g" {
                "Multi-Arch: same\n"
            } else {
                ""
            };
            out.push_str(&format!(
                "Package: {name}\n\
                 Status: install ok installed\n\
                 Priority: optional\n\
                 Section: libs\n\
                 Installed-Size: 100\n\
                 Maintainer: Test Maintainer <test@example.invalid>\n\
                 Architecture: {arch}\n\
                 {multi_arch}\
                 Source: {source}\n\
                 Version: {version}\n\
                 Description: {name} (test package)\n \
                 Generated by spcs-image-scanner test support.\n\n",
                arch = self.arch,
                source = debian_source_of(name),
            ));
        }
        out
    }

    /// The uncompressed layer tar (deterministic).
    pub fn layer_tar(&self) -> Vec<u8> {
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        files.insert(
            "etc/os-release".to_string(),
            DEBIAN_11_OS_RELEASE.as_bytes().to_vec(),
        );
        files.insert(
            "var/lib/dpkg/status".to_string(),
            self.dpkg_status().into_bytes(),
        );
        for (path, contents) in &self.extra_files {
            let path = path.trim_start_matches('/').to_string();
            assert!(!path.is_empty(), "extra file with empty path");
            files.insert(path, contents.clone());
        }
        deterministic_tar(&files)
    }

    /// Builds layer, config and manifest in `format`.
    pub fn build(&self, format: ManifestFormat) -> BuiltImage {
        let tar = self.layer_tar();
        let diff_id = sha256_digest(&tar);
        let layer = gzip(&tar);
        let config = serde_json::to_vec(&json!({
            "architecture": self.arch,
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        }))
        .expect("serialize image config");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": format.manifest_media_type(),
            "config": descriptor(format.config_media_type(), &config),
            "layers": [descriptor(format.layer_media_type(), &layer)],
        }))
        .expect("serialize image manifest");
        BuiltImage {
            format,
            digest: sha256_digest(&manifest),
            diff_id,
            layer,
            config,
            manifest,
        }
    }
}

/// Source package of well-known binary packages (else the package itself).
fn debian_source_of(package: &str) -> &str {
    match package {
        "zlib1g" | "zlib1g-dev" => "zlib",
        "libssl1.1" | "libssl-dev" => "openssl",
        "libc6" | "libc-bin" => "glibc",
        "libexpat1" => "expat",
        "libsqlite3-0" => "sqlite3",
        "libgnutls30" => "gnutls28",
        other => other,
    }
}

/// An image built by [`DebianImage::build`], ready to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub format: ManifestFormat,
    /// Digest of `manifest`.
    pub digest: String,
    /// `sha256:` of the uncompressed layer tar.
    pub diff_id: String,
    /// The gzip layer blob.
    pub layer: Vec<u8>,
    /// The config blob.
    pub config: Vec<u8>,
    /// The manifest bytes exactly as pushed.
    pub manifest: Vec<u8>,
}

impl BuiltImage {
    pub fn media_type(&self) -> &'static str {
        self.format.manifest_media_type()
    }
}

/// A manifest stored in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedManifest {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": sha256_digest(bytes),
        "size": bytes.len(),
    })
}

/// A tar of `files` plus all their parent directories, sorted, with fixed
/// metadata.
fn deterministic_tar(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut dirs = std::collections::BTreeSet::new();
    for path in files.keys() {
        let mut parent = std::path::Path::new(path).parent();
        while let Some(dir) = parent {
            if dir.as_os_str().is_empty() {
                break;
            }
            dirs.insert(dir.to_string_lossy().into_owned());
            parent = dir.parent();
        }
    }
    // Each entry: (path, None for a directory / Some(contents) for a file).
    let mut entries: BTreeMap<String, Option<&[u8]>> = BTreeMap::new();
    for dir in dirs {
        entries.insert(dir, None);
    }
    for (path, contents) in files {
        entries.insert(path.clone(), Some(contents));
    }
    let mut builder = tar::Builder::new(Vec::new());
    for (path, contents) in &entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(FIXED_MTIME);
        let (name, data): (String, &[u8]) = match contents {
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                (format!("{path}/"), &[])
            }
            Some(data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(data.len() as u64);
                (path.clone(), data)
            }
        };
        builder
            .append_data(&mut header, &name, data)
            .unwrap_or_else(|e| panic!("append {name} to layer tar: {e}"));
    }
    builder.into_inner().expect("finish layer tar")
}

/// Deterministic gzip (mtime 0, no file name).
fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    encoder.write_all(bytes).expect("gzip layer");
    encoder.finish().expect("finish gzip layer")
}

/// Pushes blobs and manifests with the distribution API, optionally with
/// preemptive Basic auth. All methods check HTTP status codes.
#[derive(Debug, Clone)]
pub struct Pusher {
    client: reqwest::Client,
    base_url: String,
    credentials: Option<(String, String)>,
}

impl Pusher {
    /// `base_url` like `http://127.0.0.1:5000` (a trailing `/` is ignored).
    pub fn new(base_url: &str, credentials: Option<(&str, &str)>) -> Pusher {
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(PUSHER_USER_AGENT)
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("build reqwest client for Pusher");
        Pusher {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, url);
        match &self.credentials {
            Some((user, pass)) => builder.basic_auth(user, Some(pass)),
            None => builder,
        }
    }

    async fn send(
        &self,
        what: &str,
        url: &str,
        builder: reqwest::RequestBuilder,
    ) -> OciResult<reqwest::Response> {
        builder
            .send()
            .await
            .map_err(|e| OciError(format!("{what} {url}: request failed: {e}")))
    }

    /// Fails unless `resp` has status `expected`, naming the URL and status.
    async fn expect_status(
        what: &str,
        url: &str,
        resp: reqwest::Response,
        expected: StatusCode,
    ) -> OciResult<reqwest::Response> {
        if resp.status() == expected {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        err(format!(
            "{what} {url}: HTTP status {status} (expected {expected}): {}",
            body.trim()
        ))
    }

    /// Whether the blob exists in `repo`.
    pub async fn blob_exists(&self, repo: &str, digest: &str) -> OciResult<bool> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base_url);
        let resp = self
            .send("HEAD", &url, self.request(reqwest::Method::HEAD, &url))
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => err(format!("HEAD {url}: unexpected HTTP status {status}")),
        }
    }

    /// Uploads `bytes` as a blob (monolithic POST + PUT), skipping the upload
    /// if the registry already has it. Returns the digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> OciResult<String> {
        let digest = sha256_digest(bytes);
        if self.blob_exists(repo, &digest).await? {
            return Ok(digest);
        }
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base_url);
        let resp = self
            .send("POST", &url, self.request(reqwest::Method::POST, &url))
            .await?;
        let resp = Self::expect_status("POST", &url, resp, StatusCode::ACCEPTED).await?;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| OciError(format!("POST {url}: 202 without a Location header")))?
            .to_string();
        let mut put_url = self.absolute(&location);
        put_url.push(if put_url.contains('?') { '&' } else { '?' });
        put_url.push_str("digest=");
        put_url.push_str(&digest);
        let resp = self
            .send(
                "PUT",
                &put_url,
                self.request(reqwest::Method::PUT, &put_url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(bytes.to_vec()),
            )
            .await?;
        let resp = Self::expect_status("PUT", &put_url, resp, StatusCode::CREATED).await?;
        check_digest_header("PUT", &put_url, &resp, &digest)?;
        Ok(digest)
    }

    /// Resolves a `Location` header: absolute URLs as is, `/path` against the
    /// base URL, anything else relative to `/v2/`.
    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{location}", self.base_url)
        } else {
            format!("{}/v2/{location}", self.base_url)
        }
    }

    /// PUTs a manifest under `reference` (a tag or its digest). Returns its
    /// digest (checked against `Docker-Content-Digest`).
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> OciResult<String> {
        let digest = sha256_digest(bytes);
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base_url);
        let resp = self
            .send(
                "PUT",
                &url,
                self.request(reqwest::Method::PUT, &url)
                    .header(CONTENT_TYPE, media_type)
                    .body(bytes.to_vec()),
            )
            .await?;
        let resp = Self::expect_status("PUT", &url, resp, StatusCode::CREATED).await?;
        check_digest_header("PUT", &url, &resp, &digest)?;
        Ok(digest)
    }

    /// Pushes a prebuilt image's blobs and its manifest under `reference`.
    pub async fn push_built(
        &self,
        repo: &str,
        reference: &str,
        image: &BuiltImage,
    ) -> OciResult<PushedManifest> {
        self.push_blob(repo, &image.layer).await?;
        self.push_blob(repo, &image.config).await?;
        let digest = self
            .push_manifest(repo, reference, image.media_type(), &image.manifest)
            .await?;
        Ok(PushedManifest {
            digest,
            size: image.manifest.len() as u64,
            media_type: image.media_type().to_string(),
        })
    }

    /// Builds `image` in `format` and pushes it as `repo:tag`.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        image: &DebianImage,
        format: ManifestFormat,
    ) -> OciResult<PushedManifest> {
        self.push_built(repo, tag, &image.build(format)).await
    }

    /// Builds `image` in `format` and pushes it by digest only (no tag), e.g.
    /// as a child of an index.
    pub async fn push_image_by_digest(
        &self,
        repo: &str,
        image: &DebianImage,
        format: ManifestFormat,
    ) -> OciResult<PushedManifest> {
        let built = image.build(format);
        let digest = built.digest.clone();
        self.push_built(repo, &digest, &built).await
    }

    /// Pushes an OCI image index as `repo:tag` whose entries are `children`
    /// `(manifest, os, architecture)`, in the given order. The children must
    /// already be in `repo` (e.g. via [`Self::push_image_by_digest`]).
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        children: &[(PushedManifest, &str, &str)],
    ) -> OciResult<String> {
        for (child, _, _) in children {
            if self.head_manifest(repo, &child.digest).await?.is_none() {
                return err(format!(
                    "index child {}@{} is not in the registry; push it first",
                    repo, child.digest
                ));
            }
        }
        let manifests: Vec<Value> = children
            .iter()
            .map(|(child, os, arch)| {
                json!({
                    "mediaType": child.media_type,
                    "digest": child.digest,
                    "size": child.size,
                    "platform": { "architecture": arch, "os": os },
                })
            })
            .collect();
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        }))
        .expect("serialize image index");
        self.push_manifest(repo, tag, OCI_INDEX, &index).await
    }

    /// Pushes a cosign-style signature for `subject_digest` as
    /// `repo:sha256-<hex>.sig`: an OCI manifest with an image config and one
    /// `simplesigning` layer carrying the payload and a (fake) signature
    /// annotation. Returns the signature manifest's digest.
    pub async fn push_signature_artifact(
        &self,
        repo: &str,
        subject_digest: &str,
    ) -> OciResult<String> {
        let Some(hex) = subject_digest.strip_prefix("sha256:") else {
            return err(format!(
                "subject digest {subject_digest:?} is not sha256:<hex>"
            ));
        };
        let host = self
            .base_url
            .split("://")
            .nth(1)
            .unwrap_or(&self.base_url)
            .to_string();
        let payload = serde_json::to_vec(&json!({
            "critical": {
                "identity": { "docker-reference": format!("{host}/{repo}") },
                "image": { "docker-manifest-digest": subject_digest },
                "type": "cosign container image signature",
            },
            "optional": null,
        }))
        .expect("serialize simple-signing payload");
        let config = serde_json::to_vec(&json!({
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{ "created": "0001-01-01T00:00:00Z" }],
            "os": "",
            "rootfs": { "type": "layers", "diff_ids": [sha256_digest(&payload)] },
            "config": {},
        }))
        .expect("serialize signature config");
        self.push_blob(repo, &payload).await?;
        self.push_blob(repo, &config).await?;
        let mut layer = descriptor(COSIGN_SIMPLESIGNING, &payload);
        layer["annotations"] = json!({
            COSIGN_SIGNATURE_ANNOTATION:
                "MEUCIQDxZ3Rlc3Qtc2lnbmF0dXJlLW5vdC1yZWFsAiBmYWtlLXNpZ25hdHVyZS1mb3ItdGVzdHM=",
        });
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": [layer],
        }))
        .expect("serialize signature manifest");
        self.push_manifest(repo, &format!("sha256-{hex}.sig"), OCI_MANIFEST, &manifest)
            .await
    }

    /// Pushes an OCI 1.1 artifact (image manifest with `artifactType`, the
    /// empty config `{}` and one layer of `layer_media_type`) as `repo:tag`.
    pub async fn push_artifact(
        &self,
        repo: &str,
        tag: &str,
        artifact_type: &str,
        layer_media_type: &str,
        payload: &[u8],
    ) -> OciResult<PushedManifest> {
        let empty = b"{}";
        self.push_blob(repo, empty).await?;
        self.push_blob(repo, payload).await?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": descriptor(OCI_EMPTY, empty),
            "layers": [descriptor(layer_media_type, payload)],
        }))
        .expect("serialize artifact manifest");
        let digest = self
            .push_manifest(repo, tag, OCI_MANIFEST, &manifest)
            .await?;
        Ok(PushedManifest {
            digest,
            size: manifest.len() as u64,
            media_type: OCI_MANIFEST.to_string(),
        })
    }

    /// Deletes a manifest by digest (`DELETE /v2/<repo>/manifests/<digest>`,
    /// expects 202). All tags pointing at it disappear with it.
    pub async fn delete_manifest(&self, repo: &str, digest: &str) -> OciResult<()> {
        let url = format!("{}/v2/{repo}/manifests/{digest}", self.base_url);
        let resp = self
            .send("DELETE", &url, self.request(reqwest::Method::DELETE, &url))
            .await?;
        Self::expect_status("DELETE", &url, resp, StatusCode::ACCEPTED).await?;
        Ok(())
    }

    /// `HEAD /v2/<repo>/manifests/<reference>`: `Some((digest, media type))`,
    /// or `None` on 404.
    pub async fn head_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> OciResult<Option<(String, String)>> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base_url);
        let resp = self
            .send(
                "HEAD",
                &url,
                self.request(reqwest::Method::HEAD, &url)
                    .header(ACCEPT, MANIFEST_ACCEPT),
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = Self::expect_status("HEAD", &url, resp, StatusCode::OK).await?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        Ok(Some((
            header("docker-content-digest"),
            header("content-type"),
        )))
    }

    /// `GET /v2/<repo>/tags/list`: the tags, or an empty list if the
    /// repository is unknown.
    pub async fn tags_list(&self, repo: &str) -> OciResult<Vec<String>> {
        let url = format!("{}/v2/{repo}/tags/list", self.base_url);
        let resp = self
            .send("GET", &url, self.request(reqwest::Method::GET, &url))
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let resp = Self::expect_status("GET", &url, resp, StatusCode::OK).await?;
        let body: Value = resp
            .json()
            .await
            .map_err(|e| OciError(format!("GET {url}: bad JSON: {e}")))?;
        let mut tags: Vec<String> = body["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        tags.sort();
        Ok(tags)
    }
}

fn check_digest_header(
    what: &str,
    url: &str,
    resp: &reqwest::Response,
    expected: &str,
) -> OciResult<()> {
    match resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
    {
        Some(got) if got != expected => err(format!(
            "{what} {url}: registry computed digest {got}, expected {expected}"
        )),
        _ => Ok(()),
    }
}
