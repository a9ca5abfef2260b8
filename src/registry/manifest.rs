//! What a manifest is: an index to resolve, a runnable image to scan, or something that is
//! not an image (signatures, attestations, SBOMs, Helm charts, WASM) to record as
//! `unsupported`.
//!
//! The decision is made from media types only (manifest, `artifactType`, config and
//! layers), never from tag names: a cosign signature is recognised by its
//! `application/vnd.dev.cosign.simplesigning.v1+json` layer, not by its `.sig` tag.
//! Manifests are parsed loosely (unknown fields ignored) because registry data is
//! untrusted and varied.

use serde::Deserialize;

use crate::config::Platform;
use crate::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The media types the daemon asks for (`Accept`). All four, so that a registry never
/// rewrites a list into one of its children or hides an OCI index.
pub const ACCEPTED: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Config media types of runnable container images.
const IMAGE_CONFIGS: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// Layer media types that hold a filesystem.
const FILESYSTEM_LAYERS: [&str; 9] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// Annotation BuildKit puts on attestation entries of an index.
const DOCKER_REFERENCE_TYPE: &str = "vnd.docker.reference.type";

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawIndexEntry>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawIndexEntry {
    media_type: String,
    digest: String,
    platform: Option<RawPlatform>,
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct RawPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

/// What a manifest turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestKind {
    /// A runnable image; `media_type` is the manifest's.
    Image { media_type: String },
    /// An index or manifest list; `child` is the entry for the wanted platform.
    Index {
        media_type: String,
        child: Option<Digest>,
    },
    /// Not something to scan; the reason is recorded on the digest.
    Unsupported { media_type: String, reason: String },
}

/// Classifies raw manifest bytes; `platform` picks the child of an index.
pub fn classify(bytes: &[u8], platform: &Platform) -> ManifestKind {
    let raw: RawManifest = match serde_json::from_slice(bytes) {
        Ok(r) => r,
        Err(e) => {
            return ManifestKind::Unsupported {
                media_type: String::new(),
                reason: format!("manifest is not valid JSON: {e}"),
            };
        }
    };
    let media_type = raw.media_type.clone().unwrap_or_else(|| {
        if raw.manifests.is_some() {
            OCI_INDEX.to_string()
        } else if raw.schema_version == Some(1) {
            DOCKER_SCHEMA1.to_string()
        } else {
            OCI_MANIFEST.to_string()
        }
    });
    let unsupported = |reason: String| ManifestKind::Unsupported {
        // Registry text, kept in state and shown by the API, the CLI and the page:
        // bounded and without control characters.
        media_type: show(&media_type),
        reason,
    };
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            let entries = raw.manifests.unwrap_or_default();
            let child = entries
                .iter()
                .filter(|e| {
                    e.media_type == OCI_MANIFEST
                        || e.media_type == DOCKER_MANIFEST
                        || e.media_type.is_empty()
                })
                .filter(|e| {
                    e.annotations
                        .as_ref()
                        .and_then(|a| a.get(DOCKER_REFERENCE_TYPE))
                        .is_none()
                })
                .find(|e| {
                    e.platform
                        .as_ref()
                        .is_some_and(|p| platform_matches(p, platform))
                })
                .and_then(|e| Digest::parse(&e.digest).ok());
            ManifestKind::Index { media_type, child }
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            if let Some(at) = raw.artifact_type.as_deref().filter(|a| !a.is_empty()) {
                return unsupported(format!(
                    "artifact of type {}, not a container image",
                    show(at)
                ));
            }
            let config = raw.config.map(|c| c.media_type).unwrap_or_default();
            if !IMAGE_CONFIGS.contains(&config.as_str()) {
                return unsupported(format!(
                    "config media type {} is not a container image config ({})",
                    show(&config),
                    describe(&config)
                ));
            }
            let layers = raw.layers.unwrap_or_default();
            if layers.is_empty() {
                return unsupported("image has no filesystem layers".to_string());
            }
            if let Some(odd) = layers
                .iter()
                .find(|l| !FILESYSTEM_LAYERS.contains(&l.media_type.as_str()))
            {
                return unsupported(format!(
                    "layer media type {} is not a filesystem layer ({})",
                    show(&odd.media_type),
                    describe(&odd.media_type)
                ));
            }
            ManifestKind::Image { media_type }
        }
        DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => {
            unsupported("Docker schema 1 manifest (deprecated; syft cannot read it)".to_string())
        }
        other => unsupported(format!("unknown manifest media type {}", show(other))),
    }
}

fn platform_matches(p: &RawPlatform, want: &Platform) -> bool {
    if p.os != want.os || p.architecture != want.architecture {
        return false;
    }
    match (&want.variant, &p.variant) {
        (None, _) => true,
        (Some(w), Some(v)) => w == v,
        (Some(_), None) => false,
    }
}

/// A media type from the registry as it may be shown: at most 120 characters, and
/// anything but printable ASCII (control characters, terminal escapes, bidi overrides;
/// media types are ASCII) written as a `\u{..}` escape, so that a hostile manifest
/// cannot reach an operator's terminal through `status` or `report`.
fn show(media_type: &str) -> String {
    if media_type.is_empty() {
        return "(none)".to_string();
    }
    let mut out = String::new();
    for c in media_type.chars().take(120) {
        if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_unicode());
        }
    }
    out
}

/// A short human name for well-known non-image media types.
fn describe(media_type: &str) -> &'static str {
    let m = media_type;
    if m.contains("cosign") && m.contains("simplesigning") {
        "a cosign signature"
    } else if m.contains("dsse") || m.contains("in-toto") {
        "an attestation"
    } else if m.contains("spdx") || m.contains("cyclonedx") || m.contains("syft") {
        "an SBOM"
    } else if m.contains("helm") {
        "a Helm chart"
    } else if m.contains("wasm") {
        "a WebAssembly module"
    } else if m == "application/vnd.oci.empty.v1+json" {
        "an OCI artifact"
    } else {
        "not an image"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amd64() -> Platform {
        Platform::parse("linux/amd64").unwrap()
    }

    fn image(config: &str, layers: &[&str]) -> Vec<u8> {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config, "digest": format!("sha256:{}", "1".repeat(64)), "size": 2},
            "layers": layers.iter().map(|m| serde_json::json!({"mediaType": m, "digest": format!("sha256:{}", "2".repeat(64)), "size": 3})).collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn registry_text_in_a_reason_is_bounded_and_has_no_control_characters() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": format!("application/\u{1b}[31mevil\u{0}\u{202e}{}", "x".repeat(500)),
        })
        .to_string();
        let ManifestKind::Unsupported { media_type, reason } = classify(m.as_bytes(), &amd64())
        else {
            panic!("unsupported");
        };
        for text in [&media_type, &reason] {
            assert!(
                text.chars().all(|c| c.is_ascii_graphic() || c == ' '),
                "{text:?}"
            );
            assert!(text.contains("\\u{1b}"), "{text:?}");
            assert!(text.len() < 400, "{}", text.len());
        }
        let m = image(OCI_MANIFEST, &[]);
        let mut v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        v["artifactType"] = "x/\u{7}bell".into();
        let ManifestKind::Unsupported { reason, .. } = classify(v.to_string().as_bytes(), &amd64())
        else {
            panic!("unsupported");
        };
        assert!(!reason.contains('\u{7}'), "{reason:?}");
    }

    #[test]
    fn a_docker_image_is_an_image() {
        let m = image(
            "application/vnd.docker.container.image.v1+json",
            &["application/vnd.docker.image.rootfs.diff.tar.gzip"],
        );
        assert!(matches!(classify(&m, &amd64()), ManifestKind::Image { .. }));
    }

    #[test]
    fn cosign_signature_is_unsupported_by_layer_type() {
        let m = image(
            "application/vnd.oci.image.config.v1+json",
            &["application/vnd.dev.cosign.simplesigning.v1+json"],
        );
        match classify(&m, &amd64()) {
            ManifestKind::Unsupported { reason, .. } => {
                assert!(reason.contains("cosign signature"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn helm_wasm_and_artifacts_are_unsupported() {
        for (config, layer, word) in [
            (
                "application/vnd.cncf.helm.config.v1+json",
                "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                "Helm",
            ),
            (
                "application/vnd.wasm.config.v0+json",
                "application/vnd.wasm.content.layer.v1+wasm",
                "WebAssembly",
            ),
            (
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.in-toto+json",
                "attestation",
            ),
            (
                "application/vnd.oci.image.config.v1+json",
                "application/spdx+json",
                "SBOM",
            ),
        ] {
            match classify(&image(config, &[layer]), &amd64()) {
                ManifestKind::Unsupported { reason, .. } => {
                    assert!(reason.contains(word), "{reason}")
                }
                other => panic!("{config}: {other:?}"),
            }
        }
        let artifact = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json"}, "layers": [{"mediaType": "application/spdx+json"}]
        });
        assert!(matches!(
            classify(artifact.to_string().as_bytes(), &amd64()),
            ManifestKind::Unsupported { .. }
        ));
    }

    #[test]
    fn index_resolves_to_platform_and_skips_attestations() {
        let d = |c: &str| format!("sha256:{}", c.repeat(64));
        let idx = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d("a"), "size": 1, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "digest": d("c"), "size": 1, "platform": {"os": "linux", "architecture": "amd64"},
                 "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
                {"mediaType": OCI_MANIFEST, "digest": d("b"), "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
            ]
        });
        match classify(idx.to_string().as_bytes(), &amd64()) {
            ManifestKind::Index { child, .. } => assert_eq!(child.unwrap().as_str(), d("b")),
            other => panic!("{other:?}"),
        }
        let arm = Platform::parse("linux/arm64/v8").unwrap();
        match classify(idx.to_string().as_bytes(), &arm) {
            ManifestKind::Index { child, .. } => assert_eq!(child.unwrap().as_str(), d("a")),
            other => panic!("{other:?}"),
        }
        let s390 = Platform::parse("linux/s390x").unwrap();
        assert!(matches!(
            classify(idx.to_string().as_bytes(), &s390),
            ManifestKind::Index { child: None, .. }
        ));
    }

    #[test]
    fn garbage_and_schema1_are_unsupported() {
        assert!(matches!(
            classify(b"not json", &amd64()),
            ManifestKind::Unsupported { .. }
        ));
        let s1 = serde_json::json!({"schemaVersion": 1, "name": "x", "fsLayers": []});
        assert!(matches!(
            classify(s1.to_string().as_bytes(), &amd64()),
            ManifestKind::Unsupported { .. }
        ));
    }
}
