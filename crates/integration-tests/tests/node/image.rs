//! The sidecar image as users build it: the Dockerfile's final stage and the
//! image the real node runs must agree.

use std::sync::Arc;

use integration_tests::TestContext;
use integration_tests::oci::{self, DockerfileStage};

use crate::Shared;

pub async fn assembled_sidecar_image_runs_as_the_dockerfile_final_stage_says(_: Arc<Shared>) {
    let stage = DockerfileStage::of_repository().unwrap();
    assert!(
        stage.run.user.is_some() && !stage.run.entrypoint.is_empty(),
        "the Dockerfile's final stage sets USER and ENTRYPOINT: {stage:?}"
    );
    let ctx = TestContext::new("image");
    let archive = oci::build_archive(&oci::sidecar_image().unwrap(), &ctx.path("sidecar")).unwrap();
    let image = oci::read_run_config(&archive).unwrap();
    assert_eq!(image.user, stage.run.user, "user");
    assert_eq!(image.entrypoint, stage.run.entrypoint, "entrypoint");
    assert_eq!(
        image.exposed_ports, stage.run.exposed_ports,
        "exposed ports"
    );
    // The binary sits where the Dockerfile copies it, and is the static one.
    let (_, dest) = stage
        .copies
        .iter()
        .find(|(src, _)| src.ends_with("geth-peer-sidecar"))
        .expect("the final stage copies the binary");
    assert_eq!(
        image.entrypoint.first(),
        Some(dest),
        "the entrypoint is the copied binary"
    );
    let file = std::process::Command::new("file")
        .arg("-L")
        .arg(oci::sidecar_release_bin().unwrap())
        .output()
        .unwrap();
    let file = String::from_utf8_lossy(&file.stdout);
    assert!(
        file.contains("static-pie linked") || file.contains("statically linked"),
        "the image's binary is static: {file}"
    );
}
