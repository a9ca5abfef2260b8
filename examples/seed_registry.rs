//! Fills a registry with a few small sample images for the local demo (`scripts/demo`):
//! Debian 11 root filesystems whose dpkg database lists zlib1g, built in memory by the
//! same code the integration tests use (`tests/support/oci.rs`); no Docker needed.
//!
//! Usage: `cargo run --example seed_registry -- http://127.0.0.1:PORT`

#[allow(dead_code)]
#[path = "../tests/support/oci.rs"]
mod oci;

use oci::{DebianImage, ManifestFormat, Pusher};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: seed_registry <registry base URL>")?;
    let pusher = Pusher::new(&url, None);
    let old = DebianImage::default();
    let patched = DebianImage::default().with_package("zlib1g", "1:1.2.11.dfsg-2+deb11u2");

    let a = pusher
        .push_image("demo/debian-zlib", "1.0", &old, ManifestFormat::Oci)
        .await?;
    pusher
        .push_image("demo/debian-zlib", "latest", &old, ManifestFormat::Oci)
        .await?;
    let b = pusher
        .push_image(
            "demo/debian-zlib",
            "1.1",
            &patched,
            ManifestFormat::DockerV2,
        )
        .await?;
    let amd64 = pusher
        .push_image_by_digest(
            "demo/multi-arch",
            &DebianImage::new("amd64"),
            ManifestFormat::Oci,
        )
        .await?;
    let arm64 = pusher
        .push_image_by_digest(
            "demo/multi-arch",
            &DebianImage::new("arm64"),
            ManifestFormat::Oci,
        )
        .await?;
    let index = pusher
        .push_index(
            "demo/multi-arch",
            "1",
            &[(amd64.clone(), "linux", "amd64"), (arm64, "linux", "arm64")],
        )
        .await?;
    let signature = pusher
        .push_signature_artifact("demo/debian-zlib", &a.digest)
        .await?;

    println!(
        "demo/debian-zlib:1.0, :latest  {}  (zlib1g 1:1.2.11.dfsg-2)",
        a.digest
    );
    println!(
        "demo/debian-zlib:1.1           {}  (zlib1g 1:1.2.11.dfsg-2+deb11u2)",
        b.digest
    );
    println!(
        "demo/multi-arch:1              {index}  (index; amd64 child {})",
        amd64.digest
    );
    println!("demo/debian-zlib signature     {signature}  (cosign-style, not an image)");
    Ok(())
}
