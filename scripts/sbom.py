#!/usr/bin/env python3
"""SPDX 2.3 SBOM of the geth-peer-sidecar image, from what the build links.

    scripts/sbom.py amd64|arm64 [OUT]

Lists what ends up in the image: the static binary, every Rust crate compiled
into it (cargo tree: normal dependencies of sidecar-bin for the target, as a
release build of it resolves them; no dev, build-only or proc-macro crates), the C library linked
statically (glibc from the Debian cross/native libc6-dev the build uses, version
read with dpkg-query), and the distroless base image by reference (its own
SBOM comes from its publisher). Writes OUT (default
target/sbom/geth-peer-sidecar-<arch>.spdx.json) and prints its path.
"""
import datetime
import hashlib
import json
import os
import subprocess
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIPLES = {"amd64": "x86_64-unknown-linux-gnu", "arm64": "aarch64-unknown-linux-gnu"}
LIBC_DEV = {"amd64": ["libc6-dev", "libc6-dev-amd64-cross"], "arm64": ["libc6-dev-arm64-cross"]}
BASE = "gcr.io/distroless/static-debian12:nonroot"


def spdx_id(name, version):
    safe = "".join(c if c.isalnum() or c in ".-" else "-" for c in f"{name}-{version}")
    return f"SPDXRef-Package-{safe}"


def linked_crates(triple):
    """The crates compiled into sidecar-bin's binary for `triple`: cargo tree's
    normal edges with the features a release build of that package resolves
    (no dev or build dependencies, no proc macros, which run only at compile
    time)."""
    out = subprocess.check_output(
        ["cargo", "tree", "--locked", "-p", "sidecar-bin", "-e", "normal,no-proc-macro",
         "--target", triple, "--prefix", "none", "-f", "{p}|{l}"],
        cwd=ROOT, text=True,
    )
    crates = {}
    for line in out.splitlines():
        line = line.removesuffix(" (*)").strip()
        if not line or "|" not in line:
            continue
        pkg, license = line.split("|", 1)
        parts = pkg.split()
        name, version = parts[0], parts[1].lstrip("v")
        local = len(parts) > 2 and parts[2].startswith("(/")
        crates[(name, version)] = {
            "name": name,
            "version": version,
            "license": license or None,
            "source": None if local else "registry",
        }
    return [crates[k] for k in sorted(crates)]


def libc_version(arch):
    for pkg in LIBC_DEV[arch]:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return pkg, out.stdout.strip()
    return LIBC_DEV[arch][0], "NOASSERTION"


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in TRIPLES:
        sys.exit("usage: scripts/sbom.py amd64|arm64 [OUT]")
    arch = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        ROOT, "target", "sbom", f"geth-peer-sidecar-{arch}.spdx.json")
    crates = linked_crates(TRIPLES[arch])
    binary = os.path.join(ROOT, "target", "static", TRIPLES[arch], "release", "geth-peer-sidecar")
    app = next(c for c in crates if c["name"] == "sidecar-bin")
    packages = [{
        "SPDXID": "SPDXRef-Package-geth-peer-sidecar",
        "name": "geth-peer-sidecar",
        "versionInfo": app["version"],
        "downloadLocation": "NOASSERTION",
        "licenseConcluded": app.get("license") or "NOASSERTION",
        "licenseDeclared": app.get("license") or "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "APPLICATION",
    }]
    if os.path.isfile(binary):
        with open(binary, "rb") as f:
            packages[0]["checksums"] = [{"algorithm": "SHA256", "checksumValue": hashlib.sha256(f.read()).hexdigest()}]
    relationships = [{
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Package-geth-peer-sidecar",
    }]
    for c in crates:
        if c["name"] in ("sidecar-bin",):
            continue
        sid = spdx_id(c["name"], c["version"])
        local = c.get("source") is None
        packages.append({
            "SPDXID": sid,
            "name": c["name"],
            "versionInfo": c["version"],
            "downloadLocation": "NOASSERTION" if local else f"https://crates.io/api/v1/crates/{c['name']}/{c['version']}/download",
            "licenseConcluded": c.get("license") or "NOASSERTION",
            "licenseDeclared": c.get("license") or "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "externalRefs": [] if local else [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": f"pkg:cargo/{c['name']}@{c['version']}",
            }],
        })
        relationships.append({
            "spdxElementId": "SPDXRef-Package-geth-peer-sidecar",
            "relationshipType": "STATIC_LINK",
            "relatedSpdxElement": sid,
        })
    libc_pkg, libc_ver = libc_version(arch)
    packages.append({
        "SPDXID": "SPDXRef-Package-glibc",
        "name": "glibc",
        "versionInfo": libc_ver,
        "downloadLocation": "NOASSERTION",
        "licenseConcluded": "LGPL-2.1-or-later",
        "licenseDeclared": "LGPL-2.1-or-later",
        "copyrightText": "NOASSERTION",
        "comment": f"linked statically from Debian {libc_pkg}",
        "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                          "referenceLocator": f"pkg:deb/debian/{libc_pkg}@{libc_ver}"}],
    })
    relationships.append({"spdxElementId": "SPDXRef-Package-geth-peer-sidecar",
                          "relationshipType": "STATIC_LINK", "relatedSpdxElement": "SPDXRef-Package-glibc"})
    packages.append({
        "SPDXID": "SPDXRef-Package-base-image",
        "name": BASE,
        "versionInfo": "nonroot",
        "downloadLocation": f"https://{BASE.split(':')[0]}",
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "primaryPackagePurpose": "CONTAINER",
        "comment": "the image's base layer (ca-certificates, tzdata, /etc/passwd); its SBOM is published with it",
        "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                          "referenceLocator": "pkg:oci/static-debian12?repository_url=gcr.io/distroless&tag=nonroot"}],
    })
    relationships.append({"spdxElementId": "SPDXRef-Package-geth-peer-sidecar",
                          "relationshipType": "DEPENDS_ON", "relatedSpdxElement": "SPDXRef-Package-base-image"})
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"geth-peer-sidecar-{app['version']}-linux-{arch}",
        "documentNamespace": f"https://geth-peer-sidecar.invalid/spdx/{app['version']}/{arch}/{uuid.uuid4()}",
        "creationInfo": {
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "creators": ["Tool: geth-peer-sidecar scripts/sbom.py"],
        },
        "packages": packages,
        "relationships": relationships,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
