//! Container images assembled without an engine or a registry: OCI image-layout
//! archives (one layer, a config, a manifest, an index) that `ctr images import`
//! loads into the real node's containerd.
//!
//! The sidecar's image is made from the static release binary exactly as the
//! `Dockerfile` builds it, with the user, entrypoint and exposed port of the
//! Dockerfile's final stage ([`DockerfileStage`]): a test compares the two.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::{Error, Result, io_err, testbed, workspace_root};

/// The geth image's reference: the chart's default `images.geth`.
pub const GETH_IMAGE: &str = "docker.io/ethereum/client-go:v1.17.5";
/// The sidecar image's reference: the chart's default `images.sidecar` with the
/// chart's appVersion.
pub const SIDECAR_IMAGE: &str = "docker.io/library/geth-peer-sidecar:0.1.0";
/// The pod sandbox image (containerd's pinned `sandbox` image).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:gps-testbed";

/// What an image's config says about how its process runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// `User` (e.g. `10001:10001`).
    pub user: Option<String>,
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `ExposedPorts` keys (e.g. `9090/tcp`), sorted.
    pub exposed_ports: Vec<String>,
    /// `Env` (`KEY=value`).
    pub env: Vec<String>,
}

/// A file placed in an image's single layer.
#[derive(Clone, Debug)]
pub enum Entry {
    /// A regular file copied from the host with this mode.
    File {
        /// Where it comes from.
        src: PathBuf,
        /// Absolute path inside the image.
        dest: String,
        /// Unix mode.
        mode: u32,
    },
    /// A file with the given contents.
    Text {
        /// Absolute path inside the image.
        dest: String,
        /// Contents.
        contents: String,
        /// Unix mode.
        mode: u32,
    },
    /// A directory with this mode.
    Dir {
        /// Absolute path inside the image.
        dest: String,
        /// Unix mode.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Absolute path inside the image.
        dest: String,
        /// Link target.
        target: String,
    },
}

/// An image to assemble.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// Full reference (e.g. `docker.io/library/geth-peer-sidecar:0.1.0`).
    pub reference: String,
    /// Layer contents.
    pub entries: Vec<Entry>,
    /// How its process runs.
    pub run: RunConfig,
}

/// The final stage of a Dockerfile: what it copies and how the process runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DockerfileStage {
    /// The base image of the stage.
    pub from: String,
    /// `COPY --from=... SRC DEST` lines as (src, dest).
    pub copies: Vec<(String, String)>,
    /// USER, ENTRYPOINT and EXPOSE.
    pub run: RunConfig,
}

impl DockerfileStage {
    /// Parses the last stage of a Dockerfile (instructions after the last
    /// `FROM`; JSON-form ENTRYPOINT only, as ours uses).
    pub fn parse_final(text: &str) -> Result<Self> {
        // Join continuation lines and drop comments.
        let joined = text.replace("\\\n", " ");
        let lines: Vec<&str> = joined
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let start = lines
            .iter()
            .rposition(|l| l.to_ascii_uppercase().starts_with("FROM "))
            .ok_or_else(|| Error::Setup("Dockerfile has no FROM".into()))?;
        let mut stage = DockerfileStage::default();
        for line in &lines[start..] {
            let (instr, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match instr.to_ascii_uppercase().as_str() {
                "FROM" => stage.from = rest.split_whitespace().next().unwrap_or("").into(),
                "USER" => stage.run.user = Some(rest.to_owned()),
                "EXPOSE" => stage
                    .run
                    .exposed_ports
                    .extend(rest.split_whitespace().map(|p| {
                        if p.contains('/') {
                            p.to_owned()
                        } else {
                            format!("{p}/tcp")
                        }
                    })),
                "ENTRYPOINT" => {
                    stage.run.entrypoint = serde_json::from_str(rest).map_err(|e| {
                        Error::Setup(format!("Dockerfile ENTRYPOINT {rest:?} is not JSON: {e}"))
                    })?
                }
                "CMD" => {
                    stage.run.cmd = serde_json::from_str(rest).map_err(|e| {
                        Error::Setup(format!("Dockerfile CMD {rest:?} is not JSON: {e}"))
                    })?
                }
                "COPY" => {
                    let words: Vec<&str> = rest
                        .split_whitespace()
                        .filter(|w| !w.starts_with("--"))
                        .collect();
                    if let [src, dest] = words.as_slice() {
                        stage.copies.push(((*src).to_owned(), (*dest).to_owned()));
                    }
                }
                _ => {}
            }
        }
        stage.run.exposed_ports.sort();
        Ok(stage)
    }

    /// The repository's `Dockerfile`, final stage.
    pub fn of_repository() -> Result<Self> {
        let path = workspace_root().join("Dockerfile");
        let text =
            std::fs::read_to_string(&path).map_err(io_err(format!("read {}", path.display())))?;
        Self::parse_final(&text)
    }
}

/// The `/etc/passwd`, `/etc/group` and `/tmp` of a distroless static base.
fn distroless_base() -> Vec<Entry> {
    vec![
        Entry::Dir {
            dest: "/etc".into(),
            mode: 0o755,
        },
        Entry::Text {
            dest: "/etc/passwd".into(),
            contents: "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n".into(),
            mode: 0o644,
        },
        Entry::Text {
            dest: "/etc/group".into(),
            contents: "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n".into(),
            mode: 0o644,
        },
        Entry::Dir {
            dest: "/tmp".into(),
            mode: 0o1777,
        },
    ]
}

/// The static release binary the Dockerfile's build stage makes
/// (`GPS_SIDECAR_RELEASE_BIN`, else where scripts/lint-image.sh builds it:
/// target/static/x86_64-unknown-linux-gnu/release).
///
/// # Errors
/// When it has not been built (scripts/lint-image.sh builds it, as the test
/// command does).
pub fn sidecar_release_bin() -> Result<PathBuf> {
    let path = std::env::var_os("GPS_SIDECAR_RELEASE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::target_dir().join("static/x86_64-unknown-linux-gnu/release/geth-peer-sidecar")
        });
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Setup(format!(
            "{} is missing: build the image's static binary first with `scripts/lint-image.sh` \
             (RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --locked -p sidecar-bin \
             --target x86_64-unknown-linux-gnu); scripts/test.sh does",
            path.display()
        )))
    }
}

/// The sidecar image: the static release binary where the Dockerfile's final
/// stage copies it, on a distroless-like base, with that stage's user,
/// entrypoint and exposed ports.
pub fn sidecar_image() -> Result<ImageSpec> {
    let stage = DockerfileStage::of_repository()?;
    let (_, dest) = stage
        .copies
        .iter()
        .find(|(src, _)| src.ends_with("geth-peer-sidecar"))
        .ok_or_else(|| {
            Error::Setup("the Dockerfile's final stage copies no geth-peer-sidecar binary".into())
        })?;
    let mut entries = distroless_base();
    entries.push(Entry::File {
        src: sidecar_release_bin()?,
        dest: dest.clone(),
        mode: 0o755,
    });
    let mut run = stage.run.clone();
    run.env = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()];
    Ok(ImageSpec {
        reference: SIDECAR_IMAGE.into(),
        entries,
        run,
    })
}

/// The absolute paths of `busybox`'s applets (`busybox --list-full`).
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = run(
        Command::new(busybox).arg("--list-full"),
        "busybox --list-full",
    )?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        // Not busybox itself, and not `linuxrc` (no directory: not an applet).
        .filter(|p| p.contains('/') && !p.ends_with("/busybox"))
        .map(|p| format!("/{}", p.trim_start_matches('/')))
        .collect())
}

/// The geth image: the test bed's geth and a static busybox with its applets
/// linked (the chart's init container runs `sh -c`; users `kill`), entrypoint
/// `geth` like ethereum/client-go.
pub fn geth_image() -> Result<ImageSpec> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Setup("busybox is missing: apt-get install busybox-static".into()))?;
    let mut entries = distroless_base();
    entries.extend([
        Entry::Dir {
            dest: "/bin".into(),
            mode: 0o755,
        },
        Entry::File {
            src: busybox.clone(),
            dest: "/bin/busybox".into(),
            mode: 0o755,
        },
        Entry::File {
            src: testbed().bin("geth"),
            dest: "/usr/local/bin/geth".into(),
            mode: 0o755,
        },
    ]);
    // Every applet at the path busybox lists for it (/bin/kill, /bin/sh,
    // /usr/bin/...), as ethereum/client-go's Alpine base installs them, so
    // what users run in that container (`kill 1`, `sh -c`) runs here too.
    for path in busybox_applets(&busybox)? {
        entries.push(Entry::Symlink {
            dest: path,
            target: "/bin/busybox".into(),
        });
    }
    Ok(ImageSpec {
        reference: GETH_IMAGE.into(),
        entries,
        run: RunConfig {
            entrypoint: vec!["geth".into()],
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            exposed_ports: vec!["30303/tcp".into()],
            ..RunConfig::default()
        },
    })
}

/// The pod sandbox image: the test bed's static pause program.
pub fn pause_image() -> ImageSpec {
    ImageSpec {
        reference: PAUSE_IMAGE.into(),
        entries: vec![Entry::File {
            src: testbed().bin("pause"),
            dest: "/pause".into(),
            mode: 0o755,
        }],
        run: RunConfig {
            entrypoint: vec!["/pause".into()],
            user: Some("65535:65535".into()),
            ..RunConfig::default()
        },
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let out = cmd.output().map_err(io_err(what.to_owned()))?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn sha256_file(path: &Path) -> Result<String> {
    let out = run(
        Command::new("sha256sum").arg(path),
        &format!("sha256sum {}", path.display()),
    )?;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| Error::Setup("sha256sum printed nothing".into()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Writes a blob into `layout/blobs/sha256/` and returns (digest, size).
fn put_blob(layout: &Path, file: &Path) -> Result<(String, u64)> {
    let digest = sha256_file(file)?;
    let size = std::fs::metadata(file).map_err(io_err("stat blob"))?.len();
    let dest = layout.join("blobs/sha256").join(&digest);
    std::fs::rename(file, &dest).map_err(io_err("move blob"))?;
    Ok((format!("sha256:{digest}"), size))
}

fn put_json_blob(layout: &Path, value: &serde_json::Value) -> Result<(String, u64)> {
    let tmp = layout.join("blob.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(value).map_err(|e| Error::Setup(e.to_string()))?,
    )
    .map_err(io_err("write blob"))?;
    put_blob(layout, &tmp)
}

/// Assembles `spec` as an OCI image-layout archive under `work` and returns the
/// archive's path. The layer is a deterministic tar (owner 0:0, mtime 0, sorted).
pub fn build_archive(spec: &ImageSpec, work: &Path) -> Result<PathBuf> {
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(&rootfs).map_err(io_err("create rootfs"))?;
    std::fs::create_dir_all(layout.join("blobs/sha256")).map_err(io_err("create layout"))?;
    for entry in &spec.entries {
        let (dest, mode) = match entry {
            Entry::File { dest, mode, .. }
            | Entry::Text { dest, mode, .. }
            | Entry::Dir { dest, mode } => (dest, Some(*mode)),
            Entry::Symlink { dest, .. } => (dest, None),
        };
        let path = rootfs.join(dest.trim_start_matches('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("create image dir"))?;
        }
        match entry {
            Entry::File { src, .. } => {
                std::fs::copy(src, &path)
                    .map_err(io_err(format!("copy {} into the image", src.display())))?;
            }
            Entry::Text { contents, .. } => {
                std::fs::write(&path, contents).map_err(io_err("write image file"))?;
            }
            Entry::Dir { .. } => std::fs::create_dir_all(&path).map_err(io_err("mkdir"))?,
            Entry::Symlink { target, .. } => std::os::unix::fs::symlink(target, &path)
                .map_err(io_err(format!("symlink {dest}")))?,
        }
        if let Some(mode) = mode {
            set_mode(&path, mode)?;
        }
    }
    let layer = work.join("layer.tar");
    run(
        Command::new("tar")
            .args([
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--mtime=@0",
                "--sort=name",
                "-C",
            ])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
        "tar the image layer",
    )?;
    let (layer_digest, layer_size) = put_blob(&layout, &layer)?;
    let mut config = json!({
        "Entrypoint": spec.run.entrypoint,
        "Env": spec.run.env,
        "WorkingDir": "/",
    });
    if !spec.run.cmd.is_empty() {
        config["Cmd"] = json!(spec.run.cmd);
    }
    if let Some(user) = &spec.run.user {
        config["User"] = json!(user);
    }
    if !spec.run.exposed_ports.is_empty() {
        config["ExposedPorts"] = spec
            .run
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), json!({})))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    let image_config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created_by": "geth-peer-sidecar integration-tests (oci.rs)" }],
    });
    let (config_digest, config_size) = put_json_blob(&layout, &image_config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest, "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = put_json_blob(&layout, &manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": spec.reference,
                "org.opencontainers.image.ref.name": spec.reference
                    .rsplit_once(':').map(|(_, tag)| tag).unwrap_or("latest"),
            },
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).map_err(|e| Error::Setup(e.to_string()))?,
    )
    .map_err(io_err("write index.json"))?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(io_err("write oci-layout"))?;
    let archive = work.join("image.tar");
    run(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .args(["oci-layout", "index.json", "blobs"]),
        "tar the image layout",
    )?;
    Ok(archive)
}

/// Reads the run configuration back from an archive made by [`build_archive`].
pub fn read_run_config(archive: &Path) -> Result<RunConfig> {
    let read = |member: &str| -> Result<serde_json::Value> {
        let out = run(
            Command::new("tar").arg("-xOf").arg(archive).arg(member),
            &format!("read {member} from {}", archive.display()),
        )?;
        serde_json::from_slice(&out).map_err(|e| Error::Setup(format!("{member}: {e}")))
    };
    let blob = |digest: &serde_json::Value| {
        format!(
            "blobs/sha256/{}",
            digest
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("sha256:")
        )
    };
    let index = read("index.json")?;
    let manifest = read(&blob(&index["manifests"][0]["digest"]))?;
    let config = read(&blob(&manifest["config"]["digest"]))?;
    let c = &config["config"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut exposed_ports: Vec<String> = c["ExposedPorts"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    exposed_ports.sort();
    Ok(RunConfig {
        user: c["User"].as_str().map(str::to_owned),
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
        exposed_ports,
        env: strings(&c["Env"]),
    })
}
